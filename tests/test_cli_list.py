"""``curvlab list``: every component with its options, defaults and suggested settings; ``curvlab list NAME`` with
each option's meaning; unknown names exit 2; a reader that stops early (``| head``) ends it quietly."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import curvlab
from curvlab.cli import main
from curvlab.hyper import COMMON

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
CMD = f"{shlex.quote(sys.executable)} -m curvlab list"


def listed(capsys, *names: str) -> str:
    assert main(["list", *names]) == 0
    return capsys.readouterr().out


def test_piped_into_head_exits_quietly():
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{CMD} | head -3"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 3 and proc.stdout.startswith("common options")


def test_reader_gone_before_the_first_write_exits_quietly():
    """The deterministic case: the pipe is closed before curvlab writes, so every write fails (EPIPE)."""
    proc = subprocess.Popen([sys.executable, "-m", "curvlab", "list"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_full_listing_has_options_defaults_and_suggested(capsys):
    out = listed(capsys)
    lines = out.splitlines()
    assert lines[0].startswith("common options")
    assert out.count("max_skipped_steps=10") == 1 and out.count("nonfinite='skip'") == 1   # common: once, on top
    for reg in (curvlab.ESTIMATORS, curvlab.RULES, curvlab.SCALINGS, curvlab.ADAPTERS, curvlab.DATASETS,
                curvlab.MODELS):
        assert f"{reg.kind}s:" in lines
        for name in reg.names():
            assert any(line.startswith(f"  {name} ") for line in lines), name
    kfac = out[out.index("\n  kfac "):out.index("\n  miniblock ")]
    assert "damping_style='pi'" in kfac and "kfac_approx='expand'" in kfac
    assert "suggested: lr=0.1, damping=0.1, momentum=0.5, ema_decay=0.95, inv_interval=5" in kfac
    sngm = out[out.index("\n  sngm "):out.index("\nscalings:")]
    assert "suggested: lr=0.03, momentum=0.9" in sngm and "sngm_weight_decay='coupled'" in sngm
    assert "base_width=64" in out and "arguments: width=64, depth=2, activation='tanh', bias=True" in out
    assert "layers: Linear" in out


def test_one_component_with_each_options_meaning(capsys):
    out = listed(capsys, "kfac")
    assert out.startswith("estimator kfac")
    assert "damping_style = 'pi'" in out and "factored pi-damping" in out
    assert "suggested: lr=0.1, damping=0.1" in out and "fisher types: empirical, mc, type2" in out
    assert "shampoo" not in out and "natural" not in out and "max_skipped_steps" not in out
    out = listed(capsys, "natural", "MLP")
    assert "rule natural" in out and "weight_decay_style = 'coupled'" in out and "model mlp" in out
    assert "depth" in out and "model.depth in a run config" in out
    out = listed(capsys, "common")
    assert "max_skipped_steps" in out and COMMON["max_skipped_steps"].doc.split()[0] in out
    out = listed(capsys, "estimators")
    assert "  kfac " in out and "  natural " not in out


@pytest.mark.parametrize("name", ["kfca", "no_such_thing"])
def test_unknown_name_exits_2_and_lists_the_names(capsys, name):
    assert main(["list", name]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"no component named {name!r}" in captured.err
    assert "estimators: " in captured.err and "kfac" in captured.err and "digits" in captured.err
    if name == "kfca":
        assert "Did you mean 'kfac'" in captured.err


def test_unknown_name_exit_code_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "curvlab", "list", "kfca"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no component named 'kfca'" in proc.stderr and "Traceback" not in proc.stderr
