"""capture="backpack" (curvlab.backpack_capture) against the hooks backend, float64.

Every statistic both backends produce must agree: K-FAC factors for type2 and empirical exactly, per-example
gradients and row views exactly, MC factors statistically; whole optimizer trajectories exactly; the user's
model, gradients and RNG untouched; unsupported models rejected with a clear error.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("backpack", reason="the BackPACK backend needs backpack-for-pytorch")
from backpack import backpack, extend  # noqa: E402
from backpack.extensions import KFAC, KFLR  # noqa: E402

import curvlab  # noqa: E402
from curvlab import exact  # noqa: E402
from helpers import LOSS_FN, assert_close, one_step_blocks  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64")


def mlp(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias), nn.Sigmoid(),
                         nn.Linear(4, 3, bias=bias))


def cnn(seed: int = 0) -> nn.Module:
    """Conv2d with stride and padding, a bias-free Conv2d, adaptive pooling, a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1, bias=False),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 3))


MODELS = {"mlp": (lambda: mlp(True), (6,)), "mlp_nobias": (lambda: mlp(False), (6,)), "cnn": (cnn, (2, 6, 6))}


def batch(shape, n=9, loss="cross_entropy", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, 3, generator=g)
    return x, y


def factors(opt):
    return {u.name: (u.curvature.A, u.curvature.G) for u in opt.units if u.preconditioned}


def both(make, x, y, loss, fisher, **hyper):
    """K-FAC factors after one step's statistics, from the hooks and the BackPACK backend."""
    out = {}
    for capture in ("hooks", "backpack"):
        _, opt = one_step_blocks(make(), x, y, loss=loss, fisher=fisher, capture=capture, **hyper)
        out[capture] = factors(opt)
    return out["hooks"], out["backpack"]


def step_stats(model, x, y, loss, fisher, capture):
    """This step's LayerStats per layer (the views an estimator would read)."""
    opt = curvlab.optimizer(model, "kfac", "natural", loss=loss, fisher=fisher, capture=capture)
    LOSS_FN[loss](model(x), y).backward()
    stats = {u.name: opt.capture.layer_stats(u, torch.float64, None) for u in opt.units if u.preconditioned}
    opt.capture.remove()                           # the views are lazy, but read only what was recorded
    model.zero_grad()
    return stats


# -- BackPACK's own conventions ----------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_backpack_kfac_ignores_the_targets(loss):
    """The claim the fisher replay rests on: KFLR and (same seed) KFAC use only the predictive distribution."""
    model = extend(mlp())
    lossfn = extend(nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss())
    x, y1 = batch((6,), loss=loss, seed=1)
    _, y2 = batch((6,), loss=loss, seed=2)
    assert not torch.equal(y1, y2)
    for make in (KFLR, lambda: KFAC(mc_samples=3)):
        got = []
        for y in (y1, y2):
            torch.manual_seed(7)
            with backpack(make()):
                lossfn(model(x), y).backward()
            got.append({n: [f.clone() for f in getattr(p, "kflr", None) or p.kfac] for n, p in model.named_parameters()})
        for name in got[0]:
            for a, b in zip(got[0][name], got[1][name]):
                assert_close(a, b, rtol=0, atol=0, what=f"{name} with other targets")


def test_backpack_native_conv_factor_is_not_kfc():
    """BackPACK's Conv2d output factor sums over locations before the outer product; the backend overrides it.
    Guards the override: if this ever fails, BackPACK changed its convention and the override must be revisited."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
    x, y = batch((2, 6, 6))
    _, opt = one_step_blocks(model, x, y, fisher="type2")
    ext_model = extend(copy.deepcopy(model))
    with backpack(KFLR()):
        extend(nn.CrossEntropyLoss())(ext_model(x), y).backward()
    g_native = ext_model[0].weight.kflr[0] / 9                               # T = 3 x 3 output locations
    rel = float((g_native - opt.units[0].curvature.G).norm() / opt.units[0].curvature.G.norm())
    assert rel > 1e-2


# -- agreement with the hooks backend -------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_kfac_factors_agree_exactly(model_name, fisher, loss):
    make, shape = MODELS[model_name]
    x, y = batch(shape, loss=loss)
    hooks, bp = both(make, x, y, loss, fisher)
    assert set(hooks) == set(bp)
    for name in hooks:
        assert_close(bp[name][0], hooks[name][0], what=f"A of {name}")
        assert_close(bp[name][1], hooks[name][1], what=f"G of {name}")


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_per_example_grads_and_row_views_agree(model_name):
    make, shape = MODELS[model_name]
    x, y = batch(shape)
    model = make()
    hooks = step_stats(model, x, y, "cross_entropy", "empirical", "hooks")
    bp = step_stats(model, x, y, "cross_entropy", "empirical", "backpack")
    for name in hooks:
        assert_close(bp[name].per_example_grads(), hooks[name].per_example_grads(), what=f"per-example {name}")
        assert_close(bp[name].input_rows(), hooks[name].input_rows(), what=f"input rows {name}")
        (gb, wb), = bp[name].output_rows("real")
        (gh, wh), = hooks[name].output_rows("real")
        assert wb == wh
        assert_close(gb, gh, what=f"real output rows {name}")
    # an independent reference: one backward per example (first layer, weight and bias)
    layer = model[0]
    for n in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[n:n + 1]), y[n:n + 1]).backward()
        ref = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        if layer.bias is not None:
            ref = torch.cat([ref, layer.bias.grad[:, None]], 1)
        assert_close(bp["0"].per_example_grads()[n], ref, what=f"example {n} vs a single-example backward")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fisher_output_rows_agree(loss):
    """BackPACK's exact loss-Hessian square root is curvlab's type-2 vectors, one by one."""
    x, y = batch((2, 6, 6), loss=loss)
    model = cnn()
    hooks = step_stats(model, x, y, loss, "type2", "hooks")
    bp = step_stats(model, x, y, loss, "type2", "backpack")
    for name in hooks:
        rows_h, rows_b = hooks[name].output_rows("fisher"), bp[name].output_rows("fisher")
        assert len(rows_h) == len(rows_b) == 3
        for (gh, wh), (gb, wb) in zip(rows_h, rows_b):
            assert wh == wb
            assert_close(gb, gh, what=f"fisher rows {name}")


def test_gradient_accumulation_is_pooled_like_hooks():
    """Two back-propagated forwards of different sizes before one step: the same pooled factors. The objective
    is the mean over all 10 examples (the capture contract): each micro-batch's mean loss weighted by N_m / 10."""
    x, y = batch((2, 6, 6), n=10)
    out = {}
    for capture in ("hooks", "backpack"):
        for fisher in ("type2", "empirical"):
            model = cnn()
            opt = curvlab.optimizer(model, "kfac", "natural", fisher=fisher, ema_decay=0.0, capture=capture)
            (F.cross_entropy(model(x[:3]), y[:3]) * 0.3).backward()
            (F.cross_entropy(model(x[3:]), y[3:]) * 0.7).backward()
            assert opt.update_curvature()
            out[capture, fisher] = factors(opt)
    for fisher in ("type2", "empirical"):
        for name, (a, g) in out["hooks", fisher].items():
            assert_close(out["backpack", fisher][name][0], a, what=f"pooled A of {name} ({fisher})")
            assert_close(out["backpack", fisher][name][1], g, what=f"pooled G of {name} ({fisher})")


def test_mc_factors_agree_statistically_and_reproducibly():
    """MC factors of both backends approach the type-2 factors as samples grow (BackPACK draws from the
    global RNG, which the backend forks and seeds: reproducible, and the user's stream is untouched)."""
    x, y = batch((6,), n=24)
    exact_f = both(mlp, x, y, "cross_entropy", "type2")[1]
    errors = {"hooks": [], "backpack": []}
    for k in (4, 256):
        hooks, bp = both(mlp, x, y, "cross_entropy", "mc", mc_samples=k, seed=k)
        for capture, got in (("hooks", hooks), ("backpack", bp)):
            for name, (a, g) in got.items():
                assert_close(a, exact_f[name][0], what=f"A of {name} ({capture}, independent of the labels)")
            errors[capture].append(max(float((g - exact_f[n][1]).norm() / exact_f[n][1].norm())
                                       for n, (_, g) in got.items()))
    print("relative error of the MC G factor vs type-2 for 4 / 256 samples:", errors)
    for capture, (few, many) in errors.items():
        assert many < 0.12 and few / many > 3, capture
    state = torch.get_rng_state()
    again = [both(mlp, x, y, "cross_entropy", "mc", mc_samples=4, seed=s)[1] for s in (3, 3, 4)]
    assert torch.equal(torch.get_rng_state(), state), "the backend consumed the user's global RNG"
    assert all(torch.equal(again[0][n][1], again[1][n][1]) for n in again[0]), "same seed, different draws"
    assert not torch.equal(again[0]["0"][1], again[2]["0"][1]), "the seed is ignored"


def test_mc_rows_mirror_hooks_weights_and_checkpoint_restores_draws():
    """MC output rows come as M vectors of weight 1/M (as in the hooks backend) and reproduce G; the sampling
    generator is part of the optimizer checkpoint."""
    x, y = batch((2, 6, 6))
    model = cnn()
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="mc", mc_samples=5, capture="backpack", ema_decay=0.0)
    saved = opt.capture.state_dict()
    draws = []
    for _ in range(2):
        opt.capture.load_state_dict(saved)
        F.cross_entropy(model(x), y).backward()
        stats = {u.name: opt.capture.layer_stats(u, torch.float64, None) for u in opt.units}
        for name, s in stats.items():
            rows = s.output_rows("fisher")
            assert [w for _, w in rows] == [0.2] * 5
            g = sum(w * r.reshape(-1, r.shape[-1]).T @ r.reshape(-1, r.shape[-1]) for r, w in rows)
            a, g_bp = s.kron_factors("fisher")
            assert_close(g_bp, g / (9 * rows[0][0].shape[1]), what=f"G of {name} from its rows")
        draws.append(g_bp)
        opt.capture.clear()
    assert torch.equal(draws[0], draws[1]), "loading the capture state did not restore the draws"


def train(model, opt, steps, loss="cross_entropy", shape=(6,)):
    for k in range(steps):
        x, y = batch(shape, n=12, loss=loss, seed=10 + k)
        opt.zero_grad()
        LOSS_FN[loss](model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("rule", ["natural", "fop"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_optimizer_takes_the_same_steps(model_name, fisher, rule):
    make, shape = MODELS[model_name]
    params = {}
    for capture in ("hooks", "backpack"):
        model = make()
        opt = curvlab.optimizer(model, "kfac", rule, fisher=fisher, capture=capture, lr=0.1, damping=0.1,
                                momentum=0.5, inv_interval=2, stat_interval=2)
        train(model, opt, 5, shape=shape)
        params[capture] = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(p, make_p) for p, make_p in zip(params["hooks"], make().parameters()))
    for k, (b, h) in enumerate(zip(params["backpack"], params["hooks"])):
        assert_close(b, h, rtol=1e-9, atol=1e-12, what=f"parameter {k} after 5 steps")


@pytest.mark.parametrize("estimator", curvlab.ESTIMATORS.names())
def test_every_estimator_steps_the_same_with_either_backend(estimator):
    """Registry-wide: whatever views an estimator reads (factors, input/output rows, per-example gradients),
    the BackPACK backend gives the same trajectory as the hooks backend (deterministic Fisher types)."""
    cls = curvlab.ESTIMATORS.get(estimator)
    for fisher in [f for f in cls.fisher_types if f != "mc"]:
        for model_name in ("mlp", "cnn"):
            make, shape = MODELS[model_name]
            params = {}
            for capture in ("hooks", "backpack"):
                model = make()
                hyper = {**cls.suggested, "fisher": fisher, "capture": capture}
                train(model, curvlab.optimizer(model, estimator, "natural", **hyper), 3, shape=shape)
                params[capture] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            assert_close(params["backpack"], params["hooks"], rtol=1e-9, atol=1e-12,
                         what=f"{estimator} ({fisher}, {model_name}) parameters after 3 steps")


def test_nonfinite_output_gives_nonfinite_mc_statistics_not_a_crash():
    """BackPACK cannot sample from NaN logits; the backend then returns NaN statistics (the optimizer skips)."""
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="mc", capture="backpack")
    x, y = batch((6,))
    x[0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()
    stats = opt.capture.layer_stats(opt.units[0], torch.float64, None)
    a, g = stats.kron_factors("fisher")
    assert not torch.isfinite(g).all()


def test_float32_model_agrees_to_float32_precision():
    model = mlp().float()
    x, y = batch((6,))
    hooks = step_stats(model, x.float(), y, "cross_entropy", "type2", "hooks")
    bp = step_stats(model, x.float(), y, "cross_entropy", "type2", "backpack")
    for name in hooks:
        for a, b, what in zip(bp[name].kron_factors("fisher"), hooks[name].kron_factors("fisher"), "AG"):
            assert a.dtype == torch.float64
            assert_close(a, b, rtol=1e-5, atol=1e-6, what=f"{what} of {name} (float32 model)")


# -- the user's side stays untouched ------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["type2", "empirical", "mc"])
def test_user_model_gradients_and_rng_untouched(fisher):
    x, y = batch((2, 6, 6))
    reference = cnn()
    F.cross_entropy(reference(x), y).backward()
    model = cnn()
    opt = curvlab.optimizer(model, "kfac", "natural", fisher=fisher, capture="backpack")
    F.cross_entropy(model(x), y).backward()
    state = torch.get_rng_state()
    stats = {u.name: opt.capture.layer_stats(u, torch.float64, None) for u in opt.units}
    for s in stats.values():
        s.kron_factors("real" if fisher == "empirical" else "fisher")
        if fisher == "empirical":
            s.per_example_grads()
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), f"p.grad of {name} changed"
        assert not any(hasattr(p, f) for f in ("kflr", "kfac", "grad_batch")), name
    assert not any(getattr(m, "_backpack_extend", False) for m in model.modules()), "the user's model was extended"
    assert not any(m._backward_hooks for m in model.modules()), "the user's model got backward hooks"
    # torch.func on the user's model, while the backend is attached and on a statistics step
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y))(params)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(g[name], q.grad, what=f"torch.func gradient of {name}")
    blocks = exact.exact_blocks("ggn", model, x, y, modules=["6"])
    assert torch.isfinite(blocks["6"]).all()


# -- errors -------------------------------------------------------------------------------------------
class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(x))


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 3)), r"'1' \(GELU\)"),
    (Custom, r"'<root>' \(Custom\)"),
])
def test_unsupported_models_are_rejected_at_construction(make, match):
    with pytest.raises(curvlab.UnsupportedLayer, match=match) as info:
        curvlab.optimizer(make(), "kfac", "natural", fisher="type2", capture="backpack")
    assert "capture='hooks'" in str(info.value)


def test_unsupported_runtime_cases_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="type2", capture="backpack")
    x, y = batch((6,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(curvlab.UnsupportedLayer, match=r"dropout '1' is in training mode"):
        opt.step()
    opt.capture.clear()
    model.eval()                                   # the copy follows the user's train/eval flags
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.step_count == 1
    model = nn.Sequential(nn.Linear(6, 3), nn.Flatten())
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="type2", loss="mse", capture="backpack")
    F.mse_loss(model(torch.randn(4, 2, 6)), torch.randn(4, 6)).backward()
    with pytest.raises(curvlab.UnsupportedLayer, match=r"Linear layer '0' got an input of shape \(4, 2, 6\)"):
        opt.step()


def benchmark_step_time(steps: int = 30) -> dict[str, float]:
    """Median K-FAC step time, backpack over hooks, on a small MLP (steps interleaved in one process).
    Not a test (speed is never asserted): ``python tests/test_backpack_backend.py``."""
    import statistics
    ratios = {}
    for fisher in ("type2", "empirical", "mc"):
        runs = {}
        for capture in ("hooks", "backpack"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
            runs[capture] = (model, curvlab.optimizer(model, "kfac", "natural", fisher=fisher, capture=capture), [])
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
        for k in range(steps + 3):
            for model, opt, times in runs.values():
                start = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if k >= 3:
                    times.append(time.perf_counter() - start)
        med = {c: statistics.median(r[2]) for c, r in runs.items()}
        ratios[fisher] = med["backpack"] / med["hooks"]
        print(f"K-FAC fisher={fisher}: hooks {1e3 * med['hooks']:.1f} ms, backpack {1e3 * med['backpack']:.1f} ms, "
              f"ratio {ratios[fisher]:.2f}")
    return ratios


if __name__ == "__main__":
    benchmark_step_time()


def test_loss_terms_per_example_needs_the_hook_backend():
    with pytest.raises(ValueError, match="loss_terms_per_example needs capture='hooks'"):
        curvlab.optimizer(nn.Sequential(nn.Linear(3, 2)), "kfac", "natural", capture="backpack",
                          loss_terms_per_example=2)
