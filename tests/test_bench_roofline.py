"""The roofline of ``curvlab bench`` (curvlab.bench.roofline) and the nested section accounting it relies on
(curvlab.profiling). Multiply-add counts are checked against hand counts; no timing is asserted."""
import json

import pytest
import torch
from torch import nn

from curvlab.bench import Variant
from curvlab.bench.cli import main as bench_main, resolve_device
from curvlab.bench.harness import measure
from curvlab.bench.roofline import FORWARD_BACKWARD, ProductRecorder, replay_seconds
from curvlab.profiling import Sections, activated, active


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_sections_nest_with_exclusive_times():
    clock = FakeClock()
    s = Sections(clock=clock)
    with s("rule"):
        clock.t += 1.0
        assert s.current == "rule"
        with s("precondition"):
            assert s.current == "precondition"
            clock.t += 3.0
        clock.t += 0.5
    assert s.current is None
    assert s.seconds == {"rule": 1.5, "precondition": 3.0} and s.calls == {"rule": 1, "precondition": 1}


def test_activated_sets_and_restores_the_active_sections():
    s = Sections()
    assert active() is None
    with activated(s):
        assert active() is s
        with activated(None):
            assert active() is s
    assert active() is None


def test_recorder_counts_multiply_adds_per_section():
    s = Sections()
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    spd = torch.eye(6) * 3 + 0.1
    with ProductRecorder(lambda: s.current) as rec:
        a @ b                                                       # 5*7*3, outside any section
        with s("statistics"):
            torch.bmm(torch.randn(4, 5, 7), torch.randn(4, 7, 2))   # 4*5*7*2
            torch.addmm(torch.zeros(5, 3), a, b)                    # 105
        with s("refresh"):
            torch.linalg.cholesky_ex(spd)                            # 6^3/6
        with s("precondition"):
            torch.mv(a, torch.randn(7))                              # 35
            a + 1.0                                                  # not a product
    macs: dict[str, float] = {}
    for (where, sig), n in rec.counts.items():
        macs[where] = macs.get(where, 0.0) + n * rec.macs[sig]
    assert macs == {FORWARD_BACKWARD: 105, "statistics": 280 + 105, "refresh": 36, "precondition": 35}


def test_replay_times_a_plain_call_of_the_same_shapes():
    with ProductRecorder(lambda: None) as rec:
        torch.linalg.cholesky_ex(torch.eye(8, dtype=torch.float64))
        torch.randn(9, 4).T @ torch.randn(9, 5)                     # a transposed (non-contiguous) operand
    assert len(rec.counts) == 2
    for _, sig in rec.counts:
        t = replay_seconds(sig, clock=__import__("time").process_time, rounds=1, min_seconds=1e-4)
        assert t > 0


def test_measure_with_roofline_fills_sections_and_floor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    rows = measure(model, x, y, [Variant.parse("kfac:stat_interval=1,inv_interval=2"),
                                 Variant.parse("kfac/fop:stat_interval=1,inv_interval=2")],
                   repeats=1, clock="process", roofline=True)
    sgd, kfac, fop = rows
    fwd = 2 * 32 * (12 * 10 + 10 * 3) + 32 * 10 * 3                 # forward, weight grads, one input grad
    assert sgd["roofline"]["sections"][FORWARD_BACKWARD]["gmac"] * 1e9 == pytest.approx(fwd)
    assert sgd["roofline"]["floor"] == 1.0
    for r in (kfac, fop):
        roof = r["roofline"]
        assert {"statistics", "refresh", "precondition"} <= set(roof["sections"])
        assert roof["floor"] >= 1.0 and roof["gmac"] > sgd["roofline"]["gmac"]
        for name, sec in roof["sections"].items():
            assert sec["gmac"] > 0 and sec["plain_ms"] > 0 and sec["ms"] == r["breakdown_ms"].get(name, 0.0)
    # K-FAC's preconditioning per step: G^-1 V A^-1 per layer (10x10 @ 10x13 @ 13x13, 3x3 @ 3x11 @ 11x11)
    pre = 10 * 10 * 13 + 10 * 13 * 13 + 3 * 3 * 11 + 3 * 11 * 11
    assert kfac["roofline"]["sections"]["precondition"]["gmac"] * 1e9 == pytest.approx(pre)
    assert fop["roofline"]["sections"]["precondition"]["gmac"] > 2 * kfac["roofline"]["sections"]["precondition"]["gmac"]


def test_cli_prints_and_keeps_the_roofline(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench_main(["--variant", "kfac:inv_interval=2", "--hidden", "8", "--batch", "8", "--repeats", "1",
                "--threads", "1", "--clock", "process", "--json", str(path)])
    rows = json.loads(path.read_text())["cases"][0]["rows"]
    assert all({"floor", "sections", "gmac", "plain_ms"} <= set(r["roofline"]) for r in rows)
    assert "floor" in capsys.readouterr().out
    bench_main(["--variant", "identity", "--hidden", "8", "--batch", "8", "--repeats", "1", "--threads", "1",
                "--no-roofline", "--json", str(path)])
    assert all("roofline" not in r for r in json.loads(path.read_text())["cases"][0]["rows"])


def test_device_option_errors_clearly():
    with pytest.raises(SystemExit, match="--device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda").type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU path of the bench)")
def test_cuda_rows_have_peak_memory_and_roofline():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).cuda()
    x, y = torch.randn(32, 12, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
    rows = measure(model, x, y, [Variant.parse("kfac:inv_interval=2")], repeats=1, roofline=True)
    assert all(r["peak_bytes"] is not None and r["roofline"]["floor"] >= 1.0 for r in rows)


def test_cli_resnet18_shaped_workload(tmp_path):
    path = tmp_path / "bench.json"
    bench_main(["--model", "resnet18", "--cnn-width", "2", "--batch", "2", "--variant", "kfac:inv_interval=2",
                "--repeats", "1", "--threads", "1", "--clock", "process", "--json", str(path)])
    (case,) = json.loads(path.read_text())["cases"]
    assert case["model"] == "resnet18" and [r["skipped_steps"] for r in case["rows"]] == [0, 0]
    assert case["rows"][1]["roofline"]["sections"]["precondition"]["gmac"] > 0


def test_gpu_script_is_valid_bash_and_refuses_without_cuda(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "analysis" / "gpu_bench.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would run the full GPU suite")
    res = subprocess.run(["bash", str(script), str(tmp_path / "out")], env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "CUDA is not available" in res.stderr
