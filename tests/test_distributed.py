"""Data parallel (curvlab.distributed): 2 gloo processes on 127.0.0.1 equal 1 process on the whole batch.

ONE spawn of two worker processes (this file run as a script with ``--worker``) runs every scenario; the
tests compare what they wrote with single-process runs made here:

* every estimator x every rule (+ a few option variants), each with both refresh strategies and both a
  DDP-wrapped and a raw model (:func:`settings`: paired, the full cross product for K-FAC and FOP), 3 steps (statistics every step, refresh on steps 0 and 2) in float64: parameters after every step equal the
  single-process run on the concatenated batch (rank r holds the r-th half);
* checkpoint on 2 processes after 2 steps, resume on 1 process: the next 2 steps equal 4 single-process steps;
* unequal local batches (5 / 3 examples): mean statistics are batch-size weighted and gathered ones are
  concatenated, so K-FAC's and ISAAC's blocks equal the whole-batch ones;
* the statistics reduction is ONE collective per statistics step (two when some statistic is gathered);
* LM damping with the held-out rho (``damping_rho="next"``) on a raw and a DDP-wrapped model: the rho history and
  the parameters equal the single-process run's.

Fisher: "type2" where the estimator supports it, else "empirical"; the Monte-Carlo Fisher is equal in
distribution only (per-rank generators) and is not compared.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import curvlab  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import assert_close  # noqa: E402

STEPS, HALF = 3, 4
STRATEGIES = ("replicated", "distributed")
WRAPS = ("ddp", "raw")


def build_model(kind: str = "cnn") -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(25, 6), nn.Tanh(), nn.Linear(6, 3))
    else:   # conv rows T = 9 (ISAAC direct branch), linear R = 8 < 18 inputs (ISAAC Woodbury branch)
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    return model.double()


def batches(steps: int, n: int = 2 * HALF) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]


def combos() -> list[tuple[str, str, str, dict]]:
    """(estimator, rule, model kind, extra options)."""
    out = [(e, r, "cnn", {}) for e in curvlab.ESTIMATORS.names() for r in curvlab.RULES.names()]
    out += [("kfac", "natural", "cnn", {"fisher": "empirical"}), ("isaac", "natural", "cnn", {"isaac_ema": True}),
            ("miniblock", "natural", "mlp", {"miniblock_mode": "woodbury"}),
            ("shampoo", "natural", "cnn", {"shampoo_grafting": "adagrad"}),
            ("kfac", "natural", "cnn", {"damping_style": "exact"})]
    return out


def settings(est: str, rule: str) -> list[tuple[str, str]]:
    """(refresh strategy, wrapping) pairs run for a combo: both strategies and both wrappings for every pair,
    the full cross product for K-FAC and FOP (to keep the spawned test short on a loaded machine)."""
    if est == "kfac" or rule == "fop":
        return [(s, w) for s in STRATEGIES for w in WRAPS]
    return [("replicated", "ddp"), ("distributed", "raw")]


def hyper(est: str, rule: str, extra: dict) -> dict:
    cls = curvlab.ESTIMATORS.get(est)
    h = {**cls.suggested, **curvlab.RULES.get(rule).suggested, "ema_decay": 0.5, "inv_interval": 2,
         "stat_interval": 1, "fisher": "type2" if "type2" in cls.fisher_types else "empirical"}
    if est == "miniblock":
        h["fisher"] = "empirical"
    if est == "ekfac":   # a stale EKFAC basis of a rank-deficient factor depends on rounding (its docstring)
        h["inv_interval"] = 1
    return {**h, **extra}


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(model, opt, data, lo: int, hi: int) -> list[torch.Tensor]:
    out = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
        out.append(flat_params(model))
    return out


LM_RHO = ("kfac", "qmodel", {"damping": 0.3, "damping_adapt": "lm", "damping_rho": "next", "damping_interval": 1,
                              "damping_thresholds": (0.6, 0.9), "fisher": "type2", "inv_interval": 1})


def train_closure(model, opt, data, lo: int, hi: int) -> list[torch.Tensor]:
    """``train`` in the closure loop (what the adaptive damping needs)."""
    out = []
    for x, y in data:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi])
            loss.backward()
            return loss
        opt.step(closure)
        out.append(flat_params(model))
    return out


def single(est, rule, kind, extra, steps=STEPS):
    """Single-process reference on the whole batch: list of parameters per step, or the rejection message."""
    model = build_model(kind)
    try:
        opt = curvlab.optimizer(model, est, rule, **hyper(est, rule, extra))
    except (ValueError, TypeError) as err:
        return str(err)
    return train(model, opt, batches(steps), 0, 2 * HALF)


# -- the worker (run as a script) -------------------------------------------------------------------------
def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lo, hi = rank * HALF, (rank + 1) * HALF
    res: dict = {"runs": {}, "ckpt": {}}
    for est, rule, kind, extra in combos():
        for strategy, wrap in settings(est, rule):
            model = build_model(kind)
            net = DDP(model) if wrap == "ddp" else model
            try:
                opt = curvlab.optimizer(net, est, rule, data_parallel_refresh=strategy, **hyper(est, rule, extra))
            except (ValueError, TypeError) as err:
                res["runs"][(est, rule, kind, str(extra), strategy, wrap)] = str(err)
                continue
            params = train(net, opt, batches(STEPS), lo, hi)
            res["runs"][(est, rule, kind, str(extra), strategy, wrap)] = {
                "params": params, "comm": {k: dict(v) for k, v in opt.dist.comm.items()},
                "owners": opt.dist.owners}
    print(f"rank {rank}: combos {time.perf_counter() - t0:.1f}s", flush=True)
    # checkpoint on 2 processes after 2 steps (DDP model, distributed refreshes)
    for est in curvlab.ESTIMATORS.names():
        for rule in ("natural", "fop"):
            model = build_model()
            net = DDP(model)
            try:
                opt = curvlab.optimizer(net, est, rule, data_parallel_refresh="distributed", **hyper(est, rule, {}))
            except (ValueError, TypeError):
                continue     # refused in any setting (compared with the single-process refusal above)
            train(net, opt, batches(2), lo, hi)
            res["ckpt"][(est, rule)] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                                        "opt": opt.state_dict()}
    # unequal local batches (5 / 3): weighted means and gathers are exact
    lo2, hi2 = (0, 5) if rank == 0 else (5, 8)
    x, y = batches(1)[0]
    model = build_model()
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="type2")
    F.cross_entropy(model(x[lo2:hi2]), y[lo2:hi2]).backward()
    opt.update_curvature()
    res["unequal_kfac"] = opt.blocks()
    model = build_model()
    opt = curvlab.optimizer(model, "isaac", "natural", damping=1.0)
    F.cross_entropy(model(x[lo2:hi2]), y[lo2:hi2]).backward()
    opt.update_curvature()
    res["unequal_isaac"] = opt.blocks()
    # LM damping with the held-out rho (damping_rho="next"): both losses averaged over the ranks
    for wrap in WRAPS:
        model = build_model("mlp")
        net = DDP(model) if wrap == "ddp" else model
        opt = curvlab.optimizer(net, *LM_RHO[:2], **LM_RHO[2])
        params = train_closure(net, opt, batches(STEPS + 1), lo, hi)
        res[f"lm_rho_{wrap}"] = {"params": params, "history": list(opt.damping_history)}
    print(f"rank {rank}: all {time.perf_counter() - t0:.1f}s", flush=True)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    out = tempfile.mkdtemp(prefix="curvlab_dist_")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), "2", str(port), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    failed = [f"rank {r} (rc {p.returncode}):\n{log[-4000:]}" for r, (p, log) in enumerate(zip(procs, logs))
              if p.returncode != 0]
    assert not failed, "worker failed: " + "\n".join(failed)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def _close(actual, expected, what):
    assert_close(actual, expected, rtol=1e-9, atol=1e-11, what=what)


def test_two_processes_equal_one_process_on_the_whole_batch(results):
    refs: dict = {}
    checked = refused = 0
    for key, run in results[0]["runs"].items():
        est, rule, kind, extra_s, strategy, wrap = key
        extra = next(e for c in combos() for e in [c[3]] if c[:3] == (est, rule, kind) and str(e) == extra_s)
        ref = refs.setdefault(key[:4], single(est, rule, kind, extra))
        if isinstance(run, str) and not isinstance(ref, str):   # a documented data-parallel refusal only
            assert "data_parallel" in run or "data-parallel" in run or "data parallel" in run, f"{key}: {run}"
            refused += 1
            continue
        if isinstance(ref, str) or isinstance(run, str):
            assert isinstance(ref, str) and isinstance(run, str), f"{key}: rejected only in one setting: {ref} / {run}"
            refused += 1
            continue
        other = results[1]["runs"][key]["params"]
        for t in range(STEPS):
            _close(run["params"][t], ref[t], f"{key} step {t} (rank 0 vs 1 process)")
            _close(other[t], run["params"][t], f"{key} step {t} (rank 1 vs rank 0)")
        checked += 1
    assert checked == sum(len(settings(e, r)) for e, r, _, _ in combos()) - refused, checked


def test_checkpoint_on_two_processes_resumes_on_one(results):
    data = batches(4)
    for (est, rule), ck in results[0]["ckpt"].items():
        ref = single(est, rule, "cnn", {}, steps=4)
        model = build_model()
        opt = curvlab.optimizer(model, est, rule, **hyper(est, rule, {}))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        got = train(model, opt, data[2:], 0, 2 * HALF)
        for t in range(2):
            _close(got[t], ref[2 + t], f"{est}/{rule} resumed step {2 + t}")


def test_statistics_reduction_is_one_collective_per_step(results):
    for key, run in results[0]["runs"].items():
        if isinstance(run, str):
            continue
        est, rule, _, _, strategy, wrap = key
        comm = run["comm"]
        stat_calls = comm.get("statistics", {}).get("calls", 0)
        gathers = est in ("isaac", "ekfac") and "isaac_ema" not in key[3] or "woodbury" in key[3]
        assert stat_calls == (0 if est in ("identity", "shampoo") else STEPS * (2 if gathers else 1)), (key, comm)
        assert comm.get("gradients", {}).get("calls", 0) == (STEPS if wrap == "raw" else 0), (key, comm)
        assert comm.get("fop", {}).get("calls", 0) == (STEPS if rule == "fop" else 0), (key, comm)
        if strategy == "replicated" or est == "identity":
            assert "refresh" not in comm, (key, comm)
        else:   # refresh steps 0 and 2 (and ISAAC's every statistics step): one size exchange + one per owner
            assert comm["refresh"]["calls"] >= 2 * 2 and run["owners"] is not None, (key, comm)
            assert set(run["owners"].values()) == {0, 1}, run["owners"]


def test_unequal_local_batches(results):
    x, y = batches(1)[0]
    for est, hyp in (("kfac", {"fisher": "type2"}), ("isaac", {"damping": 1.0})):
        model = build_model()
        opt = curvlab.optimizer(model, est, "natural", **hyp)
        F.cross_entropy(model(x), y).backward()
        opt.update_curvature()
        for rank in range(2):
            for name, block in opt.blocks().items():
                _close(results[rank][f"unequal_{est}"][name], block, f"rank {rank} {est} block {name} (5 / 3 examples)")


def test_held_out_lm_damping_averages_both_losses_over_the_ranks(results):
    """damping_rho="next" on 2 processes (raw and DDP-wrapped model) equals 1 process on the whole batch: the same
    rho history (losses and predicted changes of the concatenated batches) and the same parameters."""
    model = build_model("mlp")
    opt = curvlab.optimizer(model, *LM_RHO[:2], **LM_RHO[2])
    ref = train_closure(model, opt, batches(STEPS + 1), 0, 2 * HALF)
    assert [h["measured_at"] for h in opt.damping_history] == list(range(1, STEPS + 1))
    assert any(h["damping"] != h["damping_before"] for h in opt.damping_history)
    for rank in range(2):
        for wrap in WRAPS:
            got = results[rank][f"lm_rho_{wrap}"]
            for mine, theirs in zip(got["history"], opt.damping_history, strict=True):
                assert mine["damping"] == pytest.approx(theirs["damping"], rel=1e-12), (rank, wrap)
                for key in ("rho", "h_before", "h_after", "predicted"):
                    assert mine[key] == pytest.approx(theirs[key], rel=1e-9), (rank, wrap, key)
            for t in range(STEPS + 1):
                _close(got["params"][t], ref[t], f"lm rho=next {wrap} rank {rank} step {t}")


def test_inactive_without_a_process_group_and_ddp_refusals():
    model = build_model()
    opt = curvlab.optimizer(model, "kfac", "natural")
    assert not opt.dist.active and opt.dist.seed(3) == 3
    with pytest.raises(ValueError, match="data_parallel=True"):
        curvlab.optimizer(model, "kfac", "natural", data_parallel=True)
    with pytest.raises(ValueError, match="data_parallel"):
        curvlab.optimizer(model, "kfac", "natural", data_parallel="yes")
    with pytest.raises(ValueError, match="data_parallel_refresh"):
        curvlab.optimizer(model, "kfac", "natural", data_parallel_refresh="sharded")


def test_reduction_lookup_triangle_packing_and_greedy_owners():
    from types import SimpleNamespace

    from curvlab import distributed as D

    class Curv:
        reductions = {"pe": "cat", "w": "none", "*": "mean_sym"}

    assert [D.reduction_of(Curv(), k) for k in ("pe0", "w12", "A")] == ["cat", "none", "mean_sym"]
    assert D.reduction_of(object(), "A") == "mean"
    with pytest.raises(ValueError, match="reductions"):
        D.reduction_of(SimpleNamespace(reductions={"A": "sum"}), "A")
    m = torch.randn(3, 4, 4, dtype=torch.float64)
    m = m + m.transpose(-1, -2)
    assert torch.equal(D._untriu(D._triu(m).reshape(-1), m.shape), m)
    dp = D.DataParallel.__new__(D.DataParallel)
    dp.world = 2
    dp.units = [SimpleNamespace(name=n, curvature=SimpleNamespace(refresh_cost=lambda c=c: c))
                for n, c in (("a", 3.0), ("b", 8.0), ("c", 5.0), ("d", 4.0))]
    assert dp._assign() == {"b": 0, "c": 1, "d": 1, "a": 0}      # largest first, to the least loaded rank
    dp.active = True
    refusing = SimpleNamespace(name="x", preconditioned=True, curvature=SimpleNamespace(data_parallel_refusal="why"))
    with pytest.raises(ValueError, match="layer 'x' cannot train data-parallel: why"):
        dp.bind([refusing])


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
