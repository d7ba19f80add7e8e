"""Injected faults are survived exactly as documented (issue 9):

* a factorization that fails is retried (symmetrize, float64, jitter), then falls back to a clamped
  eigendecomposition, and the optimizer's ``events`` name the layer and what happened; if even that is not
  finite, :class:`curvlab.FactorizationError` names the layer and no parameter moves;
* NaN/Inf in gradients or in statistics skips the step (``nonfinite="skip"``) or raises ``FloatingPointError``
  (``nonfinite="raise"``) and never writes a non-finite value into parameters, rule state or curvature state --
  for EVERY registered estimator and rule (plugins included);
* a corrupt, truncated or mismatched checkpoint is refused with a message;
* a write killed mid-way leaves the previous file intact and no temporary behind (experiments I/O).
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.experiments import io as cio

ESTIMATORS, RULES = curvlab.ESTIMATORS.names(), curvlab.RULES.names()


def mlp(width: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(opt, model, steps: int = 2, seed: int = 0) -> None:
    for k in range(steps):
        x, y = batch(seed=seed + k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def tensors(obj):
    """Every tensor in a nested state (dicts, lists, tuples), in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def optimizer_state(opt):
    """Rule state (momentum buffers ...), curvature state and counters; not the capture's RNG state, which a
    forward/backward with MC sampling advances by design."""
    sd = opt.state_dict()
    return {"state": sd["state"], "curvature": sd["curvlab"]["curvature"], "step": sd["curvlab"]["step"]}


def snapshot(opt, model):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer_state(opt))


def assert_unchanged(opt, model, snap) -> None:
    params, state = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b), "a parameter changed on a skipped step"
    assert optimizer_state(opt)["step"] == state["step"]
    now = list(tensors(optimizer_state(opt)))
    before = list(tensors(state))
    assert len(now) == len(before)
    for a, b in zip(now, before):
        assert torch.equal(a, b) or (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), "optimizer state changed"
        assert bool(torch.isfinite(a).all()) if a.is_floating_point() else True, "non-finite optimizer state"


# -- factorization ladder through the optimizer ---------------------------------------------------------------
def failing_cholesky(monkeypatch, fail_times: int):
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def fake(a, *args, **kwargs):
        calls["n"] += 1
        chol, info = real(a, *args, **kwargs)
        if calls["n"] <= fail_times:
            return chol, torch.ones_like(info)
        return chol, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fake)
    return calls


def test_cholesky_failing_once_retries_in_float64_and_reports_the_layer(monkeypatch, caplog):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1, damping=0.1)
    calls = failing_cholesky(monkeypatch, fail_times=1)
    with caplog.at_level("WARNING", logger="curvlab"):
        train(opt, model, steps=1)
    assert calls["n"] >= 2
    assert [str(e) for e in opt.events] == ["0 (factor A): Cholesky failed in torch.float32, succeeded in float64"]
    assert "0 (factor A)" in caplog.text and opt.skipped_steps == 0 and opt.step_count == 1


def test_cholesky_failing_with_jitter_reports_the_jitter(monkeypatch):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1, damping=0.1)
    failing_cholesky(monkeypatch, fail_times=3)  # dtype, float64, first jitter fail; second jitter succeeds
    train(opt, model, steps=1)
    assert len(opt.events) == 1 and "jitter" in str(opt.events[0]) and str(opt.events[0]).startswith("0 (factor A)")


def test_cholesky_always_failing_falls_back_to_clamped_eigh_and_still_trains(monkeypatch):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1, damping=0.1)
    failing_cholesky(monkeypatch, fail_times=10**9)
    train(opt, model, steps=2)
    what = {str(e) for e in opt.events}
    assert any(w.startswith("0 (factor A): Cholesky failed even with jitter; used eigendecomposition") for w in what)
    assert any(w.startswith("2 (factor G)") for w in what)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()) and opt.step_count == 2


def test_factorization_that_cannot_be_saved_raises_naming_the_layer_and_moves_nothing(monkeypatch):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1, damping=0.1)
    failing_cholesky(monkeypatch, fail_times=10**9)
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *k, **kw: tuple(t * math.nan for t in real_eigh(a, *k, **kw)))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(curvlab.FactorizationError, match=r"layer '0 \(factor A\)'.*increase `damping`"):
        train(opt, model, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


# -- NaN / Inf for every registered estimator and rule -------------------------------------------------------
COMBOS = sorted({(e, "natural") for e in ESTIMATORS} | {("kfac", r) for r in RULES} | {("identity", r) for r in RULES})


def build(estimator: str, rule: str, **extra):
    model = mlp()
    hyper = {**curvlab.ESTIMATORS.get(estimator).suggested, **extra}
    try:
        opt = curvlab.optimizer(model, estimator, rule, **hyper)
    except ValueError as err:  # a triple may refuse clearly (tests/test_grid.py checks the message)
        pytest.skip(f"{estimator} x {rule} refuses: {err}")
    return model, opt


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("estimator,rule", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_nonfinite_gradient_skips_and_writes_nothing(estimator, rule, value):
    model, opt = build(estimator, rule)
    train(opt, model, steps=2)
    snap, t = snapshot(opt, model), opt.step_count
    x, y = batch(seed=5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = value
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == t and "non-finite gradients in ['2']" in str(opt.events[-1])
    assert_unchanged(opt, model, snap)
    train(opt, model, steps=1, seed=7)  # and the next good step goes through
    assert opt.step_count == t + 1 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("estimator,rule", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_nonfinite_statistics_skip_or_raise_and_write_nothing(estimator, rule, monkeypatch):
    model, opt = build(estimator, rule)
    train(opt, model, steps=2)
    curv = opt.units[-1].curvature
    real = curv.statistics

    def poisoned(stats):
        out = real(stats)
        return {k: (v * math.nan if v.is_floating_point() else v) for k, v in out.items()}

    monkeypatch.setattr(curv, "statistics", poisoned)
    snap, t = snapshot(opt, model), opt.step_count
    x, y = batch(seed=5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if opt.skipped_steps == 0:  # an estimator without statistics (identity) has nothing to poison
        assert estimator == "identity" and opt.step_count == t + 1, opt.events
        return
    assert opt.step_count == t and "non-finite curvature statistics in layers ['2']" in str(opt.events[-1])
    assert_unchanged(opt, model, snap)
    opt.config["nonfinite"] = "raise"
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match=r"non-finite curvature statistics.*nonfinite='skip'"):
        opt.step()
    assert_unchanged(opt, model, snap)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_batch_raises_with_nonfinite_raise(estimator):
    model, opt = build(estimator, "natural", nonfinite="raise")
    train(opt, model, steps=1)
    snap = snapshot(opt, model)
    x, y = batch()
    x[3, 1] = math.nan
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        opt.step()
    assert_unchanged(opt, model, snap)


# -- checkpoints -----------------------------------------------------------------------------------------------
def saved(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def test_truncated_checkpoint_file_is_refused(tmp_path):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(opt, model)
    data = saved(opt)
    path = tmp_path / "opt.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(cio.CorruptCheckpoint, match=r"opt.pt' cannot be read .*truncated or corrupt; delete it"):
        cio.load_torch(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        cio.load_torch(path)
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        cio.load_torch(path)
    path.write_bytes(data)
    assert cio.load_torch(path)["curvlab"]["step"] == 2


def test_experiment_resume_refuses_a_corrupt_checkpoint(tmp_path):
    from curvlab.experiments import runner

    cfg = {"model": {"width": 8, "depth": 1}, "train": {"epochs": 2, "batch_size": 256},
           "optimizer": {"estimator": "identity"}}
    rdir = tmp_path / "run"
    rdir.mkdir()
    (rdir / runner.CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="checkpoint.*cannot be read.*truncated or corrupt"):
        runner.run(cfg, run_dir=rdir, quiet=True)


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("curvlab"), "not a curvlab optimizer checkpoint"),
    (lambda sd: sd["curvlab"]["names"].update(estimator="shampoo"), r"checkpoint was written by .*shampoo"),
    (lambda sd: sd["curvlab"]["curvature"].pop("2"), r"checkpoint layers \['0'\] do not match"),
])
def test_mismatched_checkpoint_is_refused_with_a_message(mutate, match):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(opt, model)
    sd = torch.load(io.BytesIO(saved(opt)), weights_only=False)
    mutate(sd)
    snap = snapshot(opt, model)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, model, snap)


def test_checkpoint_from_other_estimator_or_wider_model_is_refused():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(opt, model)
    sd = torch.load(io.BytesIO(saved(opt)), weights_only=False)
    other = curvlab.optimizer(mlp(), "shampoo", "natural")
    with pytest.raises(ValueError, match="checkpoint was written by"):
        other.load_state_dict(copy.deepcopy(sd))
    wide = mlp(width=7)
    opt_wide = curvlab.optimizer(wide, "kfac", "natural")
    with pytest.raises(ValueError, match=r"checkpoint parameter shapes do not match the model in \['0', '2'\]"):
        opt_wide.load_state_dict(copy.deepcopy(sd))


# -- interrupted writes (experiments I/O) ------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL / KeyboardInterrupt arriving in the middle of a write."""


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    path = tmp_path / "metrics.jsonl"
    cio.write_jsonl(path, [{"epoch": 0, "loss": 1.0}])
    old = path.read_bytes()

    def boom(*a, **k):
        raise Killed(where)

    if where == "write":
        real_fdopen = cio.os.fdopen

        class Half(io.RawIOBase):
            def __init__(self, handle):
                self.h = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.h.close()

            def write(self, data):
                self.h.write(data[: len(data) // 2])
                self.h.flush()
                raise Killed("write")

            def flush(self):
                self.h.flush()

            def fileno(self):
                return self.h.fileno()

        monkeypatch.setattr(cio.os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(cio.os, where, boom)
    rows = [{"epoch": k, "loss": 1.0 / (k + 1)} for k in range(50)]
    with pytest.raises(Killed):
        cio.write_jsonl(path, rows)
    monkeypatch.undo()
    assert path.read_bytes() == old, "the previous complete file was damaged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"], "a temporary file was left behind"
    assert cio.read_jsonl(path) == [{"epoch": 0, "loss": 1.0}]


def test_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(opt, model, steps=1)
    path = tmp_path / "checkpoint.pt"
    cio.atomic_torch_save(path, {"optimizer": opt.state_dict()})
    good = path.read_bytes()
    train(opt, model, steps=1)
    monkeypatch.setattr(cio.os, "replace", lambda *a: (_ for _ in ()).throw(Killed("replace")))
    with pytest.raises(Killed):
        cio.atomic_torch_save(path, {"optimizer": opt.state_dict()})
    monkeypatch.undo()
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    restored = curvlab.optimizer(mlp(), "kfac", "natural")
    restored.load_state_dict(torch.load(path, weights_only=False)["optimizer"])
    assert restored.step_count == 1


def test_json_results_never_hold_nan():
    buf = cio.finite_or_none({"loss": [1.0, math.nan, math.inf]})
    assert json.dumps(buf, allow_nan=False) == '{"loss": [1.0, null, null]}'


# -- bad input: models changed after construction, empty or mismatched data ------------------------------------
@pytest.mark.parametrize("change", ["replace_layer", "recreate_parameter", "add_layer"])
def test_model_changed_after_construction_is_detected_at_step(change):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(opt, model, steps=1)
    if change == "replace_layer":
        model[2] = nn.Linear(5, 3)
        names = r"\['2.bias', '2.weight'\]"
    elif change == "recreate_parameter":
        model[0].weight = nn.Parameter(model[0].weight.detach().clone())
        names = r"\['0.weight'\]"
    else:
        model.append(nn.Linear(3, 3))
        names = r"\['3.bias', '3.weight'\]"
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=names + r".*changed after the optimizer was built|"
                       r"changed after the optimizer was built: " + names + r".*build a new optimizer"):
        opt.step()
    assert all(torch.equal(a.detach(), b) for a, b in zip(opt.param_groups[0]["params"], before))


def test_freezing_a_layer_is_not_a_model_change():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(opt, model, steps=1)
    model[0].requires_grad_(False)
    model[0].weight.grad = model[0].bias.grad = None
    frozen = model[0].weight.detach().clone()
    train(opt, model, steps=1)
    assert torch.equal(model[0].weight, frozen) and opt.step_count == 2


@pytest.mark.parametrize("estimator", ["kfac", "ekfac", "isaac", "miniblock"])
def test_empty_batch_is_refused_by_the_capture(estimator):
    if estimator not in ESTIMATORS:
        pytest.skip(f"{estimator} is not installed")
    model = mlp()
    opt = curvlab.optimizer(model, estimator, "natural", **curvlab.ESTIMATORS.get(estimator).suggested)
    with pytest.raises(ValueError, match=r"layer '0' got an empty batch"):
        F.cross_entropy(model(torch.randn(0, 4)), torch.zeros(0, dtype=torch.long)).backward()
        opt.step()


def test_mismatched_or_empty_data_in_the_loaders_is_refused():
    from curvlab.data import batches

    with pytest.raises(ValueError, match="x and y must have the same length, got 10 and 9"):
        batches(torch.randn(10, 4), torch.zeros(9), 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        batches(torch.randn(10, 4), torch.zeros(10), 0)
    assert list(batches(torch.randn(0, 4), torch.zeros(0), 4)) == []
