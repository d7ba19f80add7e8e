"""curvlab.experiments.traces (timed training traces, lr sweeps, tables) exactly, and the tiny modes of
paper_figures/mbf.py and paper_figures/isaac.py end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from curvlab.experiments import traces
from curvlab.experiments.traces import (Trace, batch_stream, format_table, interleaved_step_times, time_to_threshold,
                                        train_traced)
from curvlab.linalg import FactorizationError
from helpers import assert_close, load_paper_script as load_script



def test_time_to_threshold():
    xs, loss = [0, 10, 20, 30], [1.0, 0.5, math.nan, 0.2]
    assert time_to_threshold(xs, loss, 0.5) == 10
    assert time_to_threshold(xs, loss, 0.3) == 30          # the NaN never counts as reaching it
    assert time_to_threshold(xs, loss, 0.1) is None
    assert time_to_threshold(xs, [0.1, 0.3, None, 0.9], 0.3, below=False) == 10
    with pytest.raises(ValueError, match="same length"):
        time_to_threshold(xs, loss[:2], 0.5)


def test_batch_stream_covers_each_epoch_once_and_is_seeded():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    first = [next(s) for s in [batch_stream(x, y, 3, seed=4)] for _ in range(6)]
    again = [b for b, _ in zip(batch_stream(x, y, 3, seed=4), range(6))]
    assert all(len(xb) == 3 and torch.equal(xb[:, 0].long(), yb) for xb, yb in first)
    for (a, _), (b, _) in zip(first, again):
        assert torch.equal(a, b)
    for epoch in (first[:3], first[3:]):                    # 3 full batches per epoch, 9 distinct examples
        seen = torch.cat([yb for _, yb in epoch])
        assert len(set(seen.tolist())) == 9
    with pytest.raises(ValueError, match="batch_size"):
        next(batch_stream(x, y, 11))


def test_train_traced_takes_exactly_the_stream_steps_and_times_only_the_steps():
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    model = torch.nn.Linear(3, 2).double()
    ref = torch.nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())
    calls = []

    def evaluate(m):
        calls.append(1)
        with torch.no_grad():
            return {"loss": float(F.mse_loss(m(x), y))}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = train_traced(model, opt, x, y, loss_fn=F.mse_loss, batch_size=5, steps=5, eval_every=2,
                         evaluate=evaluate, seed=3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for (xb, yb), _ in zip(batch_stream(x, y, 5, seed=3), range(5)):
        ref_opt.zero_grad()
        F.mse_loss(ref(xb), yb).backward()
        ref_opt.step()
    assert_close(model.weight, ref.weight, atol=0, rtol=0)
    assert_close(model.bias, ref.bias, atol=0, rtol=0)
    assert trace.column("step") == [0, 2, 4, 5] and len(calls) == 4 and len(trace.step_times) == 5
    assert trace.column("epoch") == [0.0, 10 / 12, 20 / 12, 25 / 12]
    assert trace.rows[0]["time_s"] == 0.0
    assert trace.rows[-1]["time_s"] == pytest.approx(sum(trace.step_times), rel=0, abs=0)
    assert trace.rows[2]["time_s"] == sum(trace.step_times[:4])
    with torch.no_grad():
        assert trace.rows[-1]["loss"] == float(F.mse_loss(ref(x), y))
    assert not trace.diverged and trace.median_step_s > 0


def test_train_traced_stops_at_divergence():
    torch.manual_seed(0)
    x = torch.randn(8, 2) * 100
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    trace = train_traced(model, opt, x, x, loss_fn=F.mse_loss, batch_size=4, steps=50, eval_every=10,
                         evaluate=lambda m: {"loss": float(F.mse_loss(m(x), x).detach())})
    assert trace.diverged and len(trace.step_times) < 50
    assert not math.isfinite(trace.rows[-1]["loss"])


class Exploding(torch.optim.SGD):
    def step(self, closure=None):
        raise FactorizationError("layer 'x': mini-blocks to invert contain NaN/Inf")


def test_train_traced_turns_a_factorization_error_into_divergence():
    x = torch.randn(8, 2)
    model = torch.nn.Linear(2, 2)
    trace = train_traced(model, Exploding(model.parameters(), lr=0.1), x, x, loss_fn=F.mse_loss, batch_size=4,
                         steps=5, eval_every=1, evaluate=lambda m: {"loss": 1.0})
    assert trace.diverged and len(trace.step_times) == 1 and "mini-blocks" in trace.error
    assert [r["step"] for r in trace.rows] == [0, 1] and math.isnan(trace.rows[-1]["loss"])


def test_interleaved_step_times_steps_every_method_on_the_same_batches():
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randn(20, 2)
    models = [torch.nn.Linear(3, 2) for _ in range(3)]
    models[1].load_state_dict(models[0].state_dict())
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(models[2].state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for (xb, yb), _ in zip(batch_stream(x, y, 4, seed=0), range(8)):
        ref_opt.zero_grad()
        F.mse_loss(ref(xb), yb).backward()
        ref_opt.step()
    setups = {k: (m, torch.optim.SGD(m.parameters(), lr=0.1)) for k, m in zip("abc", models)}
    times = interleaved_step_times(setups, x, y, loss_fn=F.mse_loss, batch_size=4, steps=6, warmup=2)
    assert list(times) == ["a", "b", "c"] and all(len(v) == 6 and min(v) > 0 for v in times.values())
    assert_close(models[0].weight, models[1].weight, atol=0, rtol=0)
    assert_close(models[2].weight, ref.weight, atol=0, rtol=0)        # warmup + steps rounds on the stream


def test_format_table():
    text = format_table([{"a": "x", "b": 1.23456, "c": None}, {"a": "long", "b": 2, "c": math.nan}], ["a", "b", "c"])
    assert text.splitlines() == ["a     b      c", "----  -----  ---", "x     1.235  -", "long  2      nan"]


def fake_trace(final: float, step_s: float) -> Trace:
    t = Trace(rows=[{"step": 0, "time_s": 0.0, "score": 1.0}, {"step": 10, "time_s": 10 * step_s, "score": final}],
              step_times=[step_s] * 10)
    return t


def test_sweep_method_picks_the_best_lr_and_reruns_it_on_every_seed():
    seen = []

    def train(model, opt, seed, desc=""):
        lr = opt.param_groups[0]["lr"]
        seen.append((lr, seed))
        return fake_trace(abs(lr - 0.3), 0.01)

    method = {"label": "m", "optimizer": "adam", "lr": 0.1}
    res = traces.sweep_method(method, (1.0, 3.0, 10.0), [5, 6], lambda s: torch.nn.Linear(2, 2), train,
                              loss="mse", score="score", lower=True)
    assert res["lr"] == pytest.approx(0.3)
    assert [g["lr"] for g in res["grid"]] == pytest.approx([0.1, 0.3, 1.0])
    assert [s for _, s in seen] == [5, 5, 5, 6] and seen[-1][0] == pytest.approx(0.3)
    assert len(res["traces"]) == 2
    seen.clear()
    short = []
    res = traces.sweep_method(method, (1.0, 3.0), [5, 6], lambda s: torch.nn.Linear(2, 2), train, loss="mse",
                              score="score", lower=True,
                              tune=lambda m, o, s, desc="": short.append(s) or fake_trace(o.param_groups[0]["lr"], 1))
    assert short == [5, 5] and res["lr"] == pytest.approx(0.1)           # lowest final = lowest lr here
    assert seen == [(pytest.approx(0.1), 5), (pytest.approx(0.1), 6)] and len(res["traces"]) == 2


def test_summary_rows_ratios_and_thresholds():
    results = {"base": {"lr": 1.0, "traces": [fake_trace(0.5, 0.01)]},
               "fast": {"lr": 2.0, "traces": [fake_trace(0.2, 0.02), fake_trace(0.4, 0.02)]}}
    rows = traces.summary_rows(results, "base", "score", True, threshold=0.5)
    assert rows[0]["step_time_vs_base"] == 1.0 and rows[1]["step_time_vs_base"] == pytest.approx(2.0)
    assert rows[1]["final_score"] == pytest.approx(0.3) and rows[1]["ms_per_step"] == pytest.approx(20.0)
    assert rows[0]["steps_to_threshold"] == 10 and rows[1]["s_to_threshold"] == pytest.approx(0.2)
    assert traces.summary_rows(results, "base", "score", True, threshold=0.1)[1]["steps_to_threshold"] is None


@pytest.mark.parametrize("name, stem, methods", [("mbf", "mbf_autoencoder", ["Adam", "K-FAC", "Shampoo", "MBF"]),
                                                 ("isaac", "isaac_mnist_mlp", ["SGD", "ISAAC", "K-FAC"])])
def test_tiny_mode_writes_figures_and_numbers(tmp_path, name, stem, methods):
    threads = torch.get_num_threads()
    try:
        out = load_script(name).main(["--mode", "tiny", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for ext in ("png", "pdf"):
        assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [r["method"] for r in saved["table"]] == methods == list(out["methods"])
    for label in methods:
        rows = saved["methods"][label]["traces"][0]["rows"]
        assert [r["step"] for r in rows] == [0, 4, 8] and rows[-1]["time_s"] > 0
    # the equal-budget record: same trials and sampler for every method, damping tuned by every curvature method,
    # the selection on validation data and the damping diagnostic of each tuned curvature method
    tuning = saved["tuning"]
    assert tuning["metric"].startswith("val_") and tuning["test_metric"].startswith("test_")
    for label in methods:
        rec = tuning["methods"][label]
        assert rec["budget"]["trials"] == 2 == len(rec["history"]) and rec["budget"]["sampler"] == "qmc"
        assert "lr" in rec["space"]
        assert saved["methods"][label]["params"]["lr"] == rec["best"]["params"]["lr"]
        if label not in ("Adam", "SGD"):
            assert "damping" in rec["space"] and rec["method"]["second_order"]
            diag = saved["damping"][label]["per_seed"][0]
            assert diag and all(v["damping"] > 0 for v in diag.values())
            assert saved["damping"][label]["summary"][0]["factors"] == len(diag)
    assert isinstance(saved["edge_hits"], dict)


def test_isaac_e1_heatmap_tiny_mode(tmp_path):
    """The E1 (lambda_g, lambda_a) heat-map: one cell per grid point, the lambda_g = inf column is zeta*."""
    threads = torch.get_num_threads()
    try:
        out = load_script("isaac").main(["--mode", "tiny", "--figure", "e1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "isaac_e1_heatmap.png").stat().st_size > 0
    saved = json.loads((tmp_path / "isaac_e1_heatmap.json").read_text())
    assert saved["lambda_g"] == [1.0, None] and len(saved["cells"]) == 4 == len(out["cells"])
    assert all(0.0 <= c["test_accuracy"] <= 1.0 and 0.0 <= c["val_accuracy"] <= 1.0 for c in saved["cells"])
    assert all(c["lr"] == max(c["grid"], key=lambda r: r["val_accuracy"])["lr"] for c in saved["cells"])
    assert "validation" in saved["setup"]["selection"] and saved["setup"]["cpu_s"] >= 0
