"""isaac_fused=True (zeta* inside backward) equals the unfused ISAAC step (float64, tight), in both branches."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.estimators.isaac_fused import unfuse
from helpers import assert_close


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 20), nn.Tanh(), nn.Linear(20, 4))


def _train(fused, rule, batch, steps=4, scaling="standard", **hyper):
    model = _mlp()
    opt = curvlab.optimizer(model, "isaac", rule, scaling, isaac_fused=fused, lr=0.3, damping=0.7,
                            momentum=0.5, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(batch, 12, generator=gen), torch.randint(0, 4, (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("batch", [6, 32])          # 6 < fan-in: woodbury; 32 >= fan-in: direct
@pytest.mark.parametrize("rule", ["natural", "sngm"])
def test_fused_equals_unfused(float64, batch, rule):
    ref, _ = _train(False, rule, batch)
    got, opt = _train(True, rule, batch)
    branches = {u.curvature.last_branch for u in opt.units if u.preconditioned}
    assert branches == ({"woodbury"} if batch == 6 else {"direct"})
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert_close(p, q, rtol=1e-11, atol=1e-13, what=f"{rule} batch {batch} {name}")


def test_fused_equals_unfused_under_mup_damping_multipliers(float64):
    ref, ropt = _train(False, "natural", 6, scaling="mup")
    got, gopt = _train(True, "natural", 6, scaling="mup")
    for p, q in zip(got.parameters(), ref.parameters()):
        assert_close(p, q, rtol=1e-11, atol=1e-13, what="mup")


def test_fused_rejections_and_unfuse():
    with pytest.raises(ValueError, match="mv"):
        curvlab.optimizer(_mlp(), "isaac", "fop", isaac_fused=True)
    with pytest.raises(ValueError, match="kl_clip"):
        curvlab.optimizer(_mlp(), "isaac", isaac_fused=True, kl_clip=0.01)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="nn.Linear"):
        curvlab.optimizer(conv, "isaac", isaac_fused=True)
    model = _mlp()
    curvlab.optimizer(model, "isaac", isaac_fused=True)
    assert "forward" in vars(model[0])
    unfuse(model[0])
    assert "forward" not in vars(model[0])


@pytest.mark.parametrize("how", ["info", "non-finite diagonal"])
def test_fused_woodbury_failed_cholesky_falls_back(monkeypatch, how):
    """A failed float32 Cholesky inside backward -- reported by LAPACK's ``info``, or a factor with a non-finite
    diagonal entry and ``info`` 0 (what the check reads) -- goes through curvlab.linalg's ladder (float64 retry), is
    reported, and the step is still the fused ISAAC step."""
    def run():
        model = _mlp()
        opt = curvlab.optimizer(model, "isaac", isaac_fused=True, lr=0.3, damping=0.7, momentum=0.0)
        gen = torch.Generator().manual_seed(2)
        x, y = torch.randn(6, 12, generator=gen), torch.randint(0, 4, (6,), generator=gen)   # 6 rows: woodbury
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return model, opt

    good, _ = run()
    real = torch.linalg.cholesky_ex

    def failing(m, *a, **k):
        chol, info = real(m, *a, **k)
        if m.dtype != torch.float32:
            return chol, info
        if how == "info":
            return chol, torch.ones_like(info)
        chol = chol.clone()
        chol[-1, -1] = float("nan")
        return chol, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    got, opt = run()
    assert {u.curvature.last_branch for u in opt.units if u.preconditioned} == {"woodbury"}
    assert any("float64" in str(e) for e in opt.events), f"no numerics event reported: {opt.events}"
    for (name, p), q in zip(got.named_parameters(), good.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what=f"step after the fallback ({name})")
