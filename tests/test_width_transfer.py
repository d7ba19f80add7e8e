"""curvlab.width_transfer (Ishikawa & Karakida, ICLR 2024, Fig. 6 protocol): the best-lr shift on synthetic result
tables, SP matched to muP at the base width, divergence recorded, and tiny end-to-end runs of
analysis/width_transfer.py and paper_figures/mup.py writing their files."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import curvlab
from curvlab import width_transfer as wt
from curvlab.data import Split
from curvlab.models import build_mlp

ROOT = Path(__file__).resolve().parents[1]
GRID = [2.0 ** k for k in range(-4, 2)]                    # 1/16 .. 2
SCALINGS = ("standard", "mup")


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(f"_script_{relative.replace('/', '_')[:-3]}", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic(est: str, scaling: str, optimum: dict[int, float], seeds=(0,), diverge=()) -> list[dict]:
    """Loss (log2 lr - log2 optimum(width))^2 + 1/width: a parabola in log-lr per width; ``diverge``: (width, lr,
    seed) records marked diverged."""
    recs = []
    for w, opt in optimum.items():
        for lr in GRID:
            for s in seeds:
                bad = (w, lr, s) in diverge
                loss = math.nan if bad else (math.log2(lr) - math.log2(opt)) ** 2 + 1.0 / w + 0.01 * s
                recs.append({"estimator": est, "scaling": scaling, "width": w, "lr": lr, "seed": s,
                             "final_loss": loss, "diverged": bad})
    return recs


def test_best_lr_shift_on_synthetic_tables():
    recs = (synthetic("kfac", "mup", {32: 0.25, 64: 0.25, 128: 0.25})
            + synthetic("kfac", "standard", {32: 0.25, 64: 0.125, 128: 1 / 16})
            + synthetic("shampoo", "standard", {128: 0.5, 32: 0.125}))       # widths out of order on purpose
    s = wt.best_lr_shift(recs)
    assert list(s) == ["kfac/mup", "kfac/standard", "shampoo/standard"]
    mup, sp, sh = s["kfac/mup"], s["kfac/standard"], s["shampoo/standard"]
    assert mup["widths"] == [32, 64, 128] and mup["best_lr"] == [0.25, 0.25, 0.25]
    assert mup["shift_log2"] == 0.0 and mup["shift_steps"] == 0 and not mup["at_edge"]
    assert sp["best_lr"] == [0.25, 0.125, 1 / 16] and sp["shift_log2"] == -2.0 and sp["shift_steps"] == -2
    assert sp["at_edge"] and sp["max_abs_shift_log2"] == 2.0 and sp["stability_edge"] == [False] * 3
    assert sh["widths"] == [32, 128] and sh["shift_log2"] == 2.0 and sh["shift_steps"] == 2
    assert mup["best_loss"] == [1 / 32, 1 / 64, 1 / 128]
    assert mup["curves"]["64"][GRID.index(0.5)] == 1.0 + 1 / 64


def test_best_lr_shift_with_seeds_and_divergence():
    # the optimum at width 64 diverges for one seed of two: that lr counts as diverged, the next best wins
    recs = synthetic("kfac", "mup", {32: 0.25, 64: 0.25}, seeds=(0, 1), diverge={(64, 0.25, 1)})
    s = wt.best_lr_shift(recs)["kfac/mup"]
    assert s["best_lr"][0] == 0.25 and s["best_loss"][0] == pytest.approx(1 / 32 + 0.005, abs=1e-15)
    assert s["best_lr"][1] == 0.125 and s["shift_steps"] == -1 and s["diverged_runs"] == 1
    assert s["stability_edge"] == [False, True]               # at 64 the next larger lr (0.25) diverged
    assert math.isnan(s["curves"]["64"][GRID.index(0.25)])
    # every lr diverges at the largest width: no best lr, NaN shift, and no crash
    recs = synthetic("kfac", "mup", {32: 0.25, 64: 0.25}, diverge={(64, lr, 0) for lr in GRID})
    s = wt.best_lr_shift(recs)["kfac/mup"]
    assert s["best_lr"] == [0.25, None] and math.isnan(s["shift_log2"]) and s["shift_steps"] is None
    assert "diverged" in wt.format_table({"kfac/mup": s})


def test_base_width_agreement_and_lr_grid():
    recs = synthetic("kfac", "mup", {32: 0.25, 64: 0.25}) + synthetic("kfac", "standard", {32: 0.5, 64: 0.25})
    # at width 32 the curves differ by (log2 lr + 2)^2 - (log2 lr + 1)^2 = 2 log2 lr + 3, largest |.| at lr=1/16: 5
    assert wt.base_width_agreement(recs) == {"kfac": 5.0}
    assert wt.lr_grid(0.1, 5, 2.0) == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.4], rel=1e-15)
    with pytest.raises(ValueError, match="points"):
        wt.lr_grid(0.1, 0)


def test_standard_init_is_mup_init_at_the_base_width():
    def weights(width: int, scaling: str) -> list[torch.Tensor]:
        torch.manual_seed(3)
        model = build_mlp((10,), 4, width=width, depth=2, activation="relu")
        if scaling == "standard":
            wt.standard_init(model, base_width=16)
            curvlab.optimizer(model, "identity", "natural", "standard")
        else:
            curvlab.optimizer(model, "identity", "natural", "mup", base_width=16)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(weights(16, "standard"), weights(16, "mup")):
        assert torch.equal(a, b)
    sp, up = weights(64, "standard"), weights(64, "mup")
    for a, b in zip(sp[:4], up[:4]):                          # input and hidden layers: b = 1/2 in both
        assert torch.equal(a, b)
    assert torch.equal(sp[4], 2.0 * up[4])                   # output: std 1/sqrt(16*64) vs 1/64


def _tiny_split(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return Split(x, y, x[:16], y[:16], num_features=6, num_classes=4, name="toy")


def test_a_diverging_run_is_recorded_not_raised():
    rec = wt.train_run(_tiny_split(), "identity", "standard", 8, 1e6, 0, hyper={"momentum": 0.9}, epochs=2,
                       batch_size=16, base_width=8)
    assert rec["diverged"] and math.isnan(rec["final_loss"]) and rec["steps"] < 8
    ok = wt.train_run(_tiny_split(), "identity", "standard", 8, 0.05, 0, hyper={}, epochs=2, batch_size=16,
                      base_width=8)
    assert not ok["diverged"] and ok["final_loss"] < ok["initial_loss"] and ok["steps"] == 8


def test_sweep_validates_its_arguments():
    split = _tiny_split()
    with pytest.raises(ValueError, match="widths"):
        wt.lr_width_sweep(split, widths=[8, 0], lrs=[0.1])
    with pytest.raises(ValueError, match="lrs for estimator 'kfac'"):
        wt.lr_width_sweep(split, estimators=["kfac"], widths=[8], lrs={"kfac": [-1.0]})
    with pytest.raises(ValueError, match="sp_init"):
        wt.lr_width_sweep(split, widths=[8], lrs=[0.1], sp_init="nope")
    with pytest.raises(ValueError, match="pool"):
        wt.pool_images(split, 2)


def test_analysis_script_writes_its_files(tmp_path):
    script = load_script("analysis/width_transfer.py")
    res = script.main(["--quick", "--out", str(tmp_path), "--widths", "8,16", "--num-train", "128", "--num-test",
                       "64", "--pool", "4", "--epochs", "1", "--lr-points", "2", "--estimators", "kfac,identity",
                       "--batch-size", "64", "--no-progress"])
    for ext in ("png", "pdf"):
        assert (tmp_path / f"width_transfer.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "width_transfer.json").read_text())
    assert set(saved["summary"]) == {f"{e}/{s}" for e in ("kfac", "identity") for s in ("standard", "mup")}
    assert len(saved["records"]) == 2 * 2 * 2 * 2
    assert res["base_width_agreement"] == {"kfac": 0.0, "identity": 0.0}     # SP == muP at the base width


def test_paper_figure_tiny_mode_writes_its_files(tmp_path):
    script = load_script("paper_figures/mup.py")
    res = script.main(["--mode", "tiny", "--out", str(tmp_path)])
    for ext in ("png", "pdf", "json"):
        assert (tmp_path / f"mup_width_transfer.{ext}").stat().st_size > 0
    keys = {f"{e}/{s}" for e in ("kfac", "shampoo", "identity") for s in ("standard", "mup")}
    assert set(res["summary"]) == set(res["summary_val"]) == set(res["budget"]) == keys
    # the same budget for every method; damping in every second-order space; K-FAC-muP's rho_B0 in the same count
    assert {b["trials"] for b in res["budget"].values()} == {script.MODES["tiny"]["trials"]}
    assert all("damping" in res["budget"][f"{e}/{s}"]["space"] for e in ("kfac", "shampoo") for s in SCALINGS)
    assert set(res["budget"]["kfac/mup"]["space"]) == {"lr", "damping", "mup_rho_B0"}
    assert set(res["budget"]["identity/mup"]["space"]) == {"lr"}
    # the tuned damping is what the sweep ran with
    for key, b in res["budget"].items():
        for name, value in b["best"].items():
            if name != "lr":
                assert res["config"]["hyper"][key][name] == value
    # every sweep run was evaluated on the validation part, never on the test set
    assert {r["eval_on"] for r in res["records"]} == {"validation"}
    # SP and muP are the same run at the base width where they share a space (K-FAC-muP tunes rho_B0 apart)
    assert res["base_width_agreement"]["shampoo"] == 0.0 and res["base_width_agreement"]["identity"] == 0.0
    assert set(res["claims"]["train_loss"]) == {"kfac", "shampoo", "identity"}
    assert set(res["coord_check_bias"]) == keys
    saved = json.loads((tmp_path / "mup_width_transfer.json").read_text())
    assert saved["tuning"]["trials"] == script.MODES["tiny"]["trials"]


def test_train_run_reports_its_held_out_part_and_damping():
    from curvlab.validation import validation_split

    split = validation_split(_tiny_split(80), 0.25, 0, "validation")
    rec = wt.train_run(split, "kfac", "mup", 8, 0.05, 0, hyper={"damping": 0.1}, epochs=1, batch_size=16,
                       base_width=8, loss="mse", diagnose=True)
    assert rec["eval_on"] == "validation" and math.isfinite(rec["eval_loss"]) and 0 <= rec["eval_acc"] <= 1
    # K-FAC, three layers, explicit damping: an A and a G row each
    assert sorted(rec["damping"]) == sorted(f"{n}/{f}" for n in ("0", "2", "4") for f in ("A", "G"))
    sgd = wt.train_run(split, "identity", "standard", 8, 0.05, 0, hyper={}, epochs=1, batch_size=16,
                       base_width=8, diagnose=True)
    assert sgd["damping"] == {} and sgd["eval_on"] == "validation"
    bad = wt.train_run(split, "identity", "standard", 8, 1e6, 0, hyper={"momentum": 0.9}, epochs=2, batch_size=16,
                       base_width=8, diagnose=True)
    assert bad["diverged"] and bad["damping"] is None and math.isnan(bad["eval_loss"])
