"""analysis/damping.py (adaptive LM damping vs a fixed grid): the measurement on synthetic curves (smoothing, L*,
steps to L*, ratio, the damping's travel time), and the tiny mode end to end: its files and the JSON's structure
(every grid value run, one damping-history entry per damping_interval optimizer steps, rho finite or NaN only for
the documented reasons, every damping move exactly omega, 1 or 1/omega as rho says)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("_script_analysis_damping", ROOT / "analysis" / "damping.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


damping = load_script()


def test_smoothing_and_travel_time():
    assert damping.smooth([3.0, 1.0, 2.0, 6.0]) == [3.0, 2.0, 2.0, 3.0]
    omega = (19 / 20) ** 5
    assert damping.steps_to_travel(1e-4, 1.0, 5, omega) == 180          # 36 adaptations of x0.774
    assert damping.steps_to_travel(1.0, 1e-4, 5, omega) == 180
    assert damping.steps_to_travel(0.1, 0.1, 5, omega) == 0
    assert damping.steps_to_travel(1.0, omega, 5, omega) == 5


def _run(start, steps, losses, adaptive, diverged=False, history=()):
    return {"start_damping": start, "steps": steps, "loss": losses, "smoothed": damping.smooth(losses),
            "diverged": diverged, "error": "step 3: Diverged" if diverged else None, "final_damping": start,
            "damping_history": list(history), "adaptive": adaptive}


def test_summary_target_ratio_and_divergence():
    steps = [0, 10, 20, 30, 40]
    fixed = [_run(1e-4, steps[:2], [2.0, math.nan], False, diverged=True),
             _run(1e-2, steps, [2.0, 1.0, 0.5, 0.4, 0.3], False),      # smoothed final 0.4 = L*, first reached at 40
             _run(1.0, steps, [2.0, 1.5, 1.2, 1.0, 0.9], False)]
    long = [0, 10, 20, 30, 40, 50, 60, 70, 80]
    adaptive = [_run(1e-4, long, [2.0, 1.0, 0.6, 0.5, 0.4, 0.35, 0.3, 0.3, 0.3], True),   # S <= 0.4 first at 60
                _run(1.0, long, [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.9, 0.8, 0.7], True)]     # never
    s = damping.summarize("kfac", fixed, adaptive, 5, (19 / 20) ** 5)
    assert s["target_loss"] == pytest.approx(0.4) and s["best_damping"] == 1e-2 and s["best_steps"] == 40
    assert s["fixed_final"]["0.0001"] is None and "0.0001" in s["fixed_diverged"]
    first, second = s["rows"]
    assert first["steps_to_L*"] == 60 and first["ratio"] == pytest.approx(1.5) and first["within_1.5x"]  # boundary
    assert second["steps_to_L*"] is None and second["ratio"] is None and not second["within_1.5x"]
    assert first["steps_to_travel"] == 90 and second["steps_to_travel"] == 90


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("damping")
    result = damping.main(["--mode", "tiny", "--out", str(out)])
    return out, result


def test_tiny_mode_writes_figure_and_numbers(tiny):
    out, _ = tiny
    for ext in ("png", "pdf", "json"):
        path = out / f"damping.{ext}"
        assert path.is_file() and path.stat().st_size > 1000, path
    assert (out / "damping.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "damping.pdf").read_bytes()[:5] == b"%PDF-"


def test_tiny_json_structure(tiny):
    out, _ = tiny
    numbers = json.loads((out / "damping.json").read_text())
    cfg = numbers["config"]
    interval, omega = cfg["damping_interval"], cfg["damping_omega"]
    assert interval == 5 and omega == pytest.approx((19 / 20) ** 5)
    assert cfg["adaptive_steps"] == int(cfg["budget_factor"] * cfg["steps"])
    assert set(numbers["estimators"]) == set(cfg["estimators"]) == {"kfac", "shampoo", "miniblock"}
    assert len(numbers["table"]) == len(cfg["estimators"]) * len(cfg["starts"])
    complete = 0
    for est, res in numbers["estimators"].items():
        assert [r["start_damping"] for r in res["fixed"]] == cfg["grid"]          # every grid value was run
        assert [r["start_damping"] for r in res["adaptive"]] == cfg["starts"]
        assert len({r["lr"] for r in res["fixed"] + res["adaptive"]}) == 1        # one lr per estimator
        summary = numbers["summary"][est]
        assert set(summary["fixed_final"]) == {str(d) for d in cfg["grid"]}
        for run in res["fixed"]:
            assert run["damping_history"] == [] and run["final_damping"] == run["start_damping"]
            assert run["steps_run"] == cfg["steps"]
        for run in res["adaptive"]:
            assert run["steps_run"] == cfg["adaptive_steps"]
            hist, t = run["damping_history"], run["optimizer_steps"]
            # one adaptation on every optimizer step t % interval == 0 (the first included)
            assert hist and len(hist) == math.ceil(t / interval), (est, len(hist), t)
            assert [h["step"] for h in hist] == list(range(0, t, interval))
            if not run["diverged"]:
                complete += 1
                assert t == cfg["adaptive_steps"] and len(hist) == cfg["adaptive_steps"] // interval
                assert run["steps"][-1] == cfg["adaptive_steps"]
            assert run["final_damping"] == pytest.approx(hist[-1]["damping"])
            before = run["start_damping"]
            for h in hist:
                assert h["damping_before"] == pytest.approx(before)
                rho = h["rho"]
                if rho is None:     # NaN: the model predicts no decrease; -inf: a non-finite loss after the step
                    assert h["predicted"] is None or h["predicted"] >= 0 or h["h_after"] is None, h
                    factor = 1.0 / omega if h["h_after"] is None else 1.0
                else:
                    assert math.isfinite(rho) and h["predicted"] < 0, h
                    factor = omega if rho > 0.75 else 1.0 / omega if rho < 0.25 else 1.0
                expected = min(max(before * factor, cfg["damping_min"]), cfg["damping_max"])
                assert h["damping"] == pytest.approx(expected, rel=1e-9), h
                before = h["damping"]
    assert complete >= 1          # at least one adaptive run went the distance (so the full-length check ran)
    for row in numbers["table"]:
        if row["steps_to_L*"] is not None and row["best_fixed_steps"]:
            assert row["ratio"] == pytest.approx(row["steps_to_L*"] / row["best_fixed_steps"])
            assert row["within_1.5x"] == (row["ratio"] <= 1.5)
        else:
            assert row["ratio"] is None and row["within_1.5x"] is False


def test_tiny_mechanism_reuses_the_fixed_grid_and_records_gamma(tiny, tmp_path):
    """--mechanism lm+gamma with --reuse-fixed: the fixed runs are the earlier ones (identical), the adaptive ones
    record gamma every gamma_interval (20) steps; a run with other settings refuses the file, naming the setting."""
    out, _ = tiny
    result = damping.main(["--mode", "tiny", "--estimators", "kfac", "--mechanism", "lm+gamma", "--reuse-fixed",
                           str(out / "damping.json"), "--out", str(tmp_path / "g")])
    assert result["config"]["mechanism_hyper"] == {"gamma_adapt": True}
    assert result["estimators"]["kfac"]["fixed"] == json.loads((out / "damping.json").read_text())["estimators"][
        "kfac"]["fixed"]
    for run in result["estimators"]["kfac"]["adaptive"]:
        assert [h["step"] for h in run["gamma_history"]] == list(range(0, run["optimizer_steps"], 20))
        assert run["gamma_history"] and run["final_gamma"] == run["gamma_history"][-1]["gamma"]
    with pytest.raises(ValueError, match="--reuse-fixed.*its rule is 'natural'"):
        damping.main(["--mode", "tiny", "--rule", "qmodel", "--reuse-fixed", str(out / "damping.json"),
                      "--out", str(tmp_path / "q")])


def test_tiny_held_out_gamma_mechanism_runs_without_lm(tiny, tmp_path):
    """--mechanism gamma-next: no LM (the damping never moves, no rho), gamma chosen on the next batch every 20
    steps, each choice measured on the step after it."""
    out, _ = tiny
    result = damping.main(["--mode", "tiny", "--estimators", "kfac", "--mechanism", "gamma-next", "--reuse-fixed",
                           str(out / "damping.json"), "--out", str(tmp_path / "n")])
    assert result["config"]["mechanism_hyper"]["gamma_score"] == "next"
    for run in result["estimators"]["kfac"]["adaptive"]:
        assert run["damping_history"] == [] and run["final_damping"] == run["start_damping"]
        steps = [h["step"] for h in run["gamma_history"]]
        assert steps == list(range(0, run["optimizer_steps"] - 1, 20))     # the last one may still be pending
