"""Divergence stops (curvlab.divergence): ``max_skipped_steps`` skipped steps in a row, or a NaN/Inf loss from
``step(closure)``, raise :class:`curvlab.Diverged` naming the layers and the remedies; the skip warning is logged
once per streak; ``curvlab run`` / ``sweep`` stop a diverging run at once and record it as diverged."""
from __future__ import annotations

import logging
import math
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.rules import Plan


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(inp=nn.Linear(4, 6), act=nn.Tanh(), out=nn.Linear(6, 3)))


def batch(bad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    if bad:
        x[0, 0] = float("nan")                               # NaN gradients in every layer
    return x, y


def step(opt, net, bad: bool = False) -> None:
    x, y = batch(bad)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()


def params(net):
    return [p.detach().clone() for p in net.parameters()]


# ------------------------------------------------------------------------------------------- the skip counter


@pytest.mark.parametrize("limit", [1, 3, 10])
def test_raises_on_exactly_the_limit_th_skip_in_a_row(limit):
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural", **({} if limit == 10 else {"max_skipped_steps": limit}))
    assert opt.config["max_skipped_steps"] == limit                      # 10 is the default
    step(opt, net)
    before = params(net)
    for _ in range(limit - 1):
        step(opt, net, bad=True)                                         # skipped, no raise yet
    assert opt.skipped_steps == limit - 1 and opt.step_count == 1
    with pytest.raises(curvlab.Diverged) as info:
        step(opt, net, bad=True)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.skipped == limit and err.step == 1 and err.layers == ["inp", "out"] and err.loss is None
    msg = str(err)
    assert f"{limit} steps in a row were skipped" in msg and "non-finite gradients in ['inp', 'out']" in msg
    assert "Layers involved: ['inp', 'out']" in msg
    assert "lower lr (now 0.1)" in msg and "more damping (now 0.001)" in msg and "kl_clip" in msg
    assert "auto" not in msg
    assert opt.skipped_steps == limit and opt.step_count == 1
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_a_successful_step_resets_the_streak_and_skips_are_all_counted():
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural", max_skipped_steps=3)
    for _ in range(2):
        step(opt, net, bad=True)
    step(opt, net)                                                        # good: the streak is over
    assert opt.step_count == 1 and opt._streak.count == 0
    for _ in range(2):
        step(opt, net, bad=True)                                          # 2 in a row again: no raise
    assert opt.skipped_steps == 4 and opt.step_count == 1
    with pytest.raises(curvlab.Diverged, match="3 steps in a row"):
        step(opt, net, bad=True)
    assert opt.skipped_steps == 5


def test_the_skip_warning_is_logged_once_per_streak(caplog):
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural")
    with caplog.at_level(logging.WARNING, logger="curvlab"):
        for _ in range(5):
            step(opt, net, bad=True)
        assert [r.getMessage().count("skipped step") for r in caplog.records] == [1]
        step(opt, net)
        for _ in range(3):
            step(opt, net, bad=True)
    warnings = [r.getMessage() for r in caplog.records if "skipped step" in r.getMessage()]
    assert len(warnings) == 2 and "non-finite gradients in ['inp', 'out']" in warnings[1]
    assert "Diverged after 10 in a row" in warnings[0]
    assert opt.skipped_steps == 8 and len([e for e in opt.events if "skipped step" in str(e)]) == 8


def test_statistics_name_only_the_bad_layer():
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural", max_skipped_steps=1)
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    opt.capture._records["out"][0].uses[0].inputs[0, 0] = float("inf")   # only out's statistics are corrupt
    with pytest.raises(curvlab.Diverged) as info:
        opt.step()
    assert info.value.layers == ["out"] and "non-finite curvature statistics in layers ['out']" in str(info.value)


def test_nonfinite_updates_name_their_layer(monkeypatch):
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural", max_skipped_steps=2)
    step(opt, net)
    plan = opt.rule.plan

    def poisoned(units, state, stats):
        out = plan(units, state, stats)
        return Plan([(p, d * math.nan if p is net.inp.weight else d) for p, d in out.deltas()], out.state)

    monkeypatch.setattr(opt.rule, "plan", poisoned)
    step(opt, net)
    with pytest.raises(curvlab.Diverged) as info:
        step(opt, net)
    assert info.value.layers == ["inp"] and "non-finite updates in ['inp']" in str(info.value)


def test_sngm_is_not_told_to_use_kl_clip():
    net = model()
    opt = curvlab.optimizer(net, "identity", "sngm", max_skipped_steps=1)
    with pytest.raises(curvlab.Diverged) as info:
        step(opt, net, bad=True)
    assert "kl_clip" not in str(info.value).split("Remedies")[1].replace("max_skipped_steps", "")
    assert "lower lr" in str(info.value)


def test_none_never_raises_and_raise_policy_is_unchanged():
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural", max_skipped_steps=None)
    for _ in range(30):
        step(opt, net, bad=True)
    assert opt.skipped_steps == 30 and opt.step_count == 0
    opt = curvlab.optimizer(net, "kfac", "natural", nonfinite="raise", max_skipped_steps=5)
    with pytest.raises(FloatingPointError, match="non-finite gradients") as info:
        step(opt, net, bad=True)                                          # at once, the plain error
    assert type(info.value) is FloatingPointError


@pytest.mark.parametrize("value", [0, -1, 2.5, "10", True])
def test_bad_values_are_refused_by_name(value):
    with pytest.raises(curvlab.HyperParameterError, match="max_skipped_steps"):
        curvlab.optimizer(model(), "kfac", "natural", max_skipped_steps=value)


def test_diverged_is_exported_and_pickles():
    assert "Diverged" in curvlab.__all__ and issubclass(curvlab.Diverged, FloatingPointError)
    err = pickle.loads(pickle.dumps(curvlab.Diverged("boom", layers=["a"], skipped=3, step=7, loss=math.inf)))
    assert str(err) == "boom" and (err.layers, err.skipped, err.step, err.loss) == (["a"], 3, 7, math.inf)


# ------------------------------------------------------------------------------------------------ the closure


def test_closure_nan_loss_raises_at_once_and_writes_nothing():
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural")
    x, y = batch()

    def closure(bad=False):
        opt.zero_grad()
        loss = F.cross_entropy(net(batch(bad)[0]), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and opt.step_count == 1
    before = params(net)
    with pytest.raises(curvlab.Diverged) as info:
        opt.step(lambda: closure(bad=True))
    err = info.value
    assert math.isnan(err.loss) and err.layers == ["inp", "out"] and err.step == 1
    assert "loss returned by the closure is nan" in str(err) and "non-finite gradients in ['inp', 'out']" in str(err)
    assert opt.skipped_steps == 0 and opt.step_count == 1
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert opt.step(closure) is not None and opt.step_count == 2          # the optimizer is still usable


def test_closure_inf_loss_with_finite_gradients_and_opt_out():
    net = model()
    opt = curvlab.optimizer(net, "kfac", "natural")
    x, y = batch()

    def closure():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        return torch.tensor(math.inf)

    with pytest.raises(curvlab.Diverged, match="closure is inf") as info:
        opt.step(closure)
    assert info.value.layers == []
    opt = curvlab.optimizer(net, "kfac", "natural", max_skipped_steps=None)
    opt.step(closure)                                                    # opted out: the step is taken
    assert opt.step_count == 1


# ----------------------------------------------------------------------------------------- curvlab run / sweep

sklearn = pytest.importorskip("sklearn", reason="the runs train on scikit-learn's digits")
from curvlab.experiments.runner import run  # noqa: E402
from curvlab.experiments.sweep import run_sweep  # noqa: E402

#: a ReLU MLP on digits: 11 steps per epoch; lr = 1e3 blows it up within a few steps
BLOWUP = {"model": {"activation": "relu"}, "train": {"epochs": 2, "batch_size": 128},
          "optimizer": {"estimator": "shampoo", "lr": 1e3}}


def test_run_stops_at_diverged_and_records_it(tmp_path: Path):
    cfg = {**BLOWUP, "optimizer": {**BLOWUP["optimizer"], "max_skipped_steps": 3}}
    res = run(cfg, tmp_path, quiet=True)
    s, last = res.summary, res.metrics[-1]
    assert (res.run_dir / "DONE").is_file() and not (res.run_dir / "checkpoint.pt").exists()
    assert s["diverged"] is True and s["skipped_steps"] == 3
    assert s["steps"] <= 5 and s["steps"] == last["steps"]                # 2 good steps + 3 skipped, not 22
    assert len(res.metrics) == 2 and last["epoch"] == 1 and "3 steps in a row" in last["diverged"]
    assert s["diverged_reason"] == last["diverged"] and "Layers involved: ['0'" in s["diverged_reason"]
    # the same run without the stop burns both epochs on skipped steps, and its losses stay finite
    off = run({**cfg, "optimizer": {**cfg["optimizer"], "max_skipped_steps": None}}, None, quiet=True).summary
    assert off["steps"] == 22 and off["skipped_steps"] >= 17


def test_run_stops_at_a_nonfinite_loss(tmp_path: Path, capsys):
    from curvlab.experiments import cli

    assert cli.run_main(["--model.activation", "relu", "--optimizer.lr", "1e3", "--train.epochs", "2",
                         "--train.batch_size", "128", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DIVERGED after 3 steps" in out and "minibatch loss is nan at step 4" in out
    run_dir = next((tmp_path).iterdir())
    res = curvlab.experiments.runner.load_run(run_dir)
    assert res.summary["diverged"] and res.summary["steps"] == 3 and len(res.metrics) == 2


def test_sweep_records_the_diverged_run_and_goes_on(tmp_path: Path, capsys):
    cfg = {**BLOWUP, "train": {"epochs": 1, "batch_size": 128},
           "optimizer": {**BLOWUP["optimizer"], "max_skipped_steps": 3},
           "sweep": {"grid": {"optimizer.lr": [1e3, 0.02]}}}
    res = run_sweep(cfg, tmp_path, quiet=True)
    assert not res.failed and len(res.ran) == 2
    by_lr = {}
    for rid in res.run_ids:
        s = curvlab.experiments.runner.load_run(tmp_path / "runs" / rid).summary
        by_lr[s["optimizer_config"]["lr"]] = s
    assert by_lr[1e3]["diverged"] and by_lr[1e3]["steps"] == 5 and by_lr[1e3]["skipped_steps"] == 3
    assert not by_lr[0.02]["diverged"] and by_lr[0.02]["steps"] == 11 and by_lr[0.02]["diverged_reason"] is None
    assert "diverged (recorded; the sweep goes on)" in capsys.readouterr().out
