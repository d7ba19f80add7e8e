"""curvlab.experiments.ablation_report on synthetic run directories (exact tables, figures, errors), the
``curvlab report --heatmap/--vs/--target`` hook, and the tiny mode of analysis/ablation_report.py (the paper
scripts' tiny modes: tests/test_paper_figures_fop_sngm.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from curvlab.experiments import ablation_report as ar
from curvlab.experiments.cli import report_main

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = ("txt", "csv", "png", "pdf")

# final accuracy per (estimator, rule, lr), seed 0 and seed 1 (seed 1 adds DELTA)
ACC = {("identity", "natural", 0.1): 0.80, ("identity", "natural", 0.3): 0.84,
       ("identity", "fop", 0.1): 0.70, ("identity", "fop", 0.3): 0.60,
       ("kfac", "natural", 0.1): 0.90, ("kfac", "natural", 0.3): 0.88,
       ("kfac", "fop", 0.1): 0.92, ("kfac", "fop", 0.3): 0.95}
DELTA = 0.02


def write_run(root: Path, est: str, rule: str, lr: float, seed: int, acc: float, curve: list[float],
              seconds_per_epoch: float = 1.5, batch: int = 64) -> None:
    """A finished run directory as runner.run writes it (only the keys the reports read)."""
    d = root / f"{est}_{rule}_{lr}_{batch}_{seed}"
    d.mkdir(parents=True)
    config = {"name": f"{est}/{rule} lr={lr} b={batch}", "optimizer": {"estimator": est, "rule": rule, "lr": lr},
              "train": {"seed": seed, "batch_size": batch}, "data": {"name": "synthetic", "seed": 0}}
    rows = [{"epoch": 0, "test_accuracy": 0.1, "time_s": None}] + \
        [{"epoch": e + 1, "test_accuracy": a, "time_s": seconds_per_epoch * (e + 1), "test_loss": 1.0 - a}
         for e, a in enumerate(curve)]
    summary = {"task": "classification", "final_test_accuracy": acc, "best_test_accuracy": max(curve),
               "final_test_loss": 1.0 - acc, "mean_step_ms": 10.0 * (2 if est == "kfac" else 1)}
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "DONE").write_text("{}")


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    for (est, rule, lr), acc in ACC.items():
        for seed in (0, 1):
            final = acc + DELTA * seed
            # the final accuracy at epoch 3, 0.05 less at epoch 2 (except kfac/fop lr=0.3: reached at epoch 2)
            curve = [final - 0.1, final - 0.05 if (est, rule, lr) != ("kfac", "fop", 0.3) else final, final]
            write_run(tmp_path / "runs", est, rule, lr, seed, final, curve)
    return tmp_path / "runs"


def test_heatmap_exact_best_over_lr_and_mean_over_seeds(grid, tmp_path):
    h = ar.heatmap(grid, "estimator", "rule", out=tmp_path / "out")
    assert (h.row_axis, h.col_axis) == ("estimator", "rule")
    assert h.rows == ["identity", "kfac"] and h.cols == ["fop", "natural"]  # no sweep.json: label order
    # each cell: the best lr, mean over the two seeds (+0 and +DELTA)
    expect = [[0.70 + DELTA / 2, 0.84 + DELTA / 2], [0.95 + DELTA / 2, 0.90 + DELTA / 2]]
    for row, ref in zip(h.values, expect):
        assert row == pytest.approx(ref, abs=1e-12)
    assert h.best_col == [1, 0]
    assert h.labels == [["identity/fop lr=0.1 b=64", "identity/natural lr=0.3 b=64"],
                        ["kfac/fop lr=0.3 b=64", "kfac/natural lr=0.1 b=64"]]
    assert h.std[0][0] == pytest.approx(DELTA / 2 ** 0.5)
    text = h.text()
    assert "0.8500*" in text and "0.9600*" in text and "0.7100 " in text
    lines = h.csv().splitlines()
    assert lines[0] == "estimator,fop,natural"
    for line, name, ref in zip(lines[1:], h.rows, expect):
        assert line.split(",")[0] == name and [float(v) for v in line.split(",")[1:]] == pytest.approx(ref)
    stem = "heatmap_estimator_rule_final_test_accuracy"
    for suffix in SUFFIXES:
        assert (tmp_path / "out" / f"{stem}.{suffix}").stat().st_size > 0
    # a lower-is-better metric picks minima
    loss = ar.heatmap(grid, "estimator", "rule", "final_test_loss")
    assert loss.values[1][0] == pytest.approx(1 - 0.95 - DELTA / 2) and loss.best_col == [1, 0]


def test_metric_vs_axis_one_line_per_series(grid):
    c = ar.metric_vs_axis(grid, "lr", "estimator+rule")
    assert c.series_axis == "estimator+rule" and c.x_axis == "lr"
    assert list(c.points) == ["identity/fop", "identity/natural", "kfac/fop", "kfac/natural"]
    pts = c.points["kfac/fop"]
    assert [p[0] for p in pts] == [0.1, 0.3]
    assert [p[1] for p in pts] == pytest.approx([0.92 + DELTA / 2, 0.95 + DELTA / 2])
    assert pts[1][3] == "kfac/fop lr=0.3 b=64"
    assert "0.9600 ± 0.0141" in c.text()
    # each point is the best configuration over the remaining axis (lr)
    d = ar.metric_vs_axis(grid, "rule", "estimator")
    assert {s: [(x, round(v, 12), lab) for x, v, _, lab in pts] for s, pts in d.points.items()} == {
        "identity": [("fop", 0.71, "identity/fop lr=0.1 b=64"), ("natural", 0.85, "identity/natural lr=0.3 b=64")],
        "kfac": [("fop", 0.96, "kfac/fop lr=0.3 b=64"), ("natural", 0.91, "kfac/natural lr=0.1 b=64")]}
    # default series: estimator+rule (no sweep variants here)
    assert ar.metric_vs_axis(grid, "lr").series_axis == "estimator+rule"


def test_time_to_target_table_exact(grid, tmp_path):
    t = ar.time_to_target_table(grid, 0.9, ["estimator", "rule"], out=tmp_path / "out")
    assert t.rows == ["identity", "kfac"] and t.cols == ["fop", "natural"]
    texts = [[e.text() for e in row] for row in t.entries]
    # identity never reaches 0.9; kfac/natural: lr=0.1 at epoch 3 in both seeds (0.90, 0.92), lr=0.3 in
    # one seed only (0.88, 0.90): the cell is lr=0.1
    assert texts[0] == ["-", "-"]
    assert texts[1][1] == "3 / 4.5" and t.entries[1][1].label == "kfac/natural lr=0.1 b=64"
    # kfac/fop: lr=0.3 reaches 0.9 at epoch 2 in both seeds (lr=0.1: epoch 3) -> 2 / 3.0
    assert texts[1][0] == "2 / 3.0"
    assert t.entries[1][0].label == "kfac/fop lr=0.3 b=64"
    assert "'-': never reached" in t.text()
    for suffix in SUFFIXES:
        assert (tmp_path / "out" / f"time_to_0.9_by_estimator.{suffix}").is_file()
    rows = (tmp_path / "out" / "time_to_0.9_by_estimator.csv").read_text().splitlines()
    assert rows[0] == "estimator,column,epochs_to_target,seconds_to_target,seeds_reached,seeds,configuration"
    assert rows[1] == "identity,fop,,,0,2,"
    assert rows[3] == "kfac,fop,2.0,3.0,2,2,kfac/fop lr=0.3 b=64"
    one = ar.time_to_target(grid, 0.97, "estimator")
    assert one.cols == ["time"] and [e.text() for row in one.entries for e in row] == ["-", "2 / 3.0 (1/2)"]


def test_errors_name_the_axis_and_list_the_choices(grid, tmp_path):
    with pytest.raises(ValueError, match=r"axis 'optimiser' not found\. Axes that vary in these runs: "
                                         r"optimizer\.estimator, optimizer\.lr, optimizer\.rule.*any config key"):
        ar.heatmap(grid, "optimiser", "rule")
    with pytest.raises(ValueError, match=r"axis 'seed' is ambiguous: it could be train\.seed, data\.seed; "
                                         r"give the full key"):
        ar.metric_vs_axis(grid, "seed")
    with pytest.raises(ValueError, match=r"metric 'final_acc' is not in the runs' summaries; numeric summary "
                                         r"keys: best_test_accuracy, final_test_accuracy"):
        ar.heatmap(grid, "estimator", "rule", "final_acc")
    with pytest.raises(ValueError, match=r"target must be a test accuracy in \(0, 1\]"):
        ar.time_to_target_table(grid, 91, "estimator")
    with pytest.raises(ValueError, match="no finished runs under"):
        ar.heatmap(tmp_path / "empty", "estimator", "rule")


def test_report_cli_hook(grid, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_main([str(grid), "--out", str(out), "--heatmap", "estimator,rule", "--vs", "lr",
                        "--target", "0.9", "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "0.9600*" in printed and "2 / 3.0" in printed
    for name in ("report.csv", "heatmap_estimator_rule_final_test_accuracy.png", "final_test_accuracy_vs_lr.pdf",
                 "time_to_0.9_by_lr.csv"):
        assert (out / name).is_file(), name
    assert report_main([str(grid), "--out", str(out), "--heatmap", "estimator,optimiser", "--quiet"]) == 2
    assert "axis 'optimiser' not found" in capsys.readouterr().err


def load_script(rel: str):
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analysis_tiny_mode(tmp_path):
    numbers = load_script("analysis/ablation_report.py").main(["--tiny", "--out", str(tmp_path)])
    assert numbers["heatmap"]["rows"] == ["identity", "kfac"] and numbers["heatmap"]["cols"] == ["natural", "sngm"]
    for stem in ("heatmap_estimator_rule_final_test_accuracy", "final_test_accuracy_vs_lr"):
        for suffix in SUFFIXES:
            assert (tmp_path / f"{stem}.{suffix}").is_file()
    assert (tmp_path / "ablation.json").is_file() and (tmp_path / "report.csv").is_file()
