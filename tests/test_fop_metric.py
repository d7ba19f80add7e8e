"""FOP's projection metric (``fop_metric``): (F.2)-(F.3) orthogonalize in the undamped F (default) or in the damped M
whose inverse (F.4)-(F.7) apply; checked in float64 against dense K-FAC matrices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.rules.fop import fop_terms


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("style", ["pi", "exact"])
@pytest.mark.parametrize("metric", ["undamped", "damped"])
def test_projection_is_orthogonal_in_the_chosen_metric(float64, metric, style):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "kfac", "fop", damping=0.5, damping_style=style, fop_metric=metric,
                            ema_decay=0.0, fisher="type2")
    F.cross_entropy(model(torch.randn(10, 5)), torch.randint(0, 3, (10,))).backward()
    opt.update_curvature()
    opt.refresh()
    unit = opt.units[0]
    c = unit.curvature
    g1 = [torch.randn_like(p) for p in unit.params]
    g2 = [torch.randn_like(p) for p in unit.params]
    terms = fop_terms(unit, g1, g2, metric=metric)
    if style == "pi":
        ra, rg = c.damped
        dense_m = torch.kron(c.G + rg * torch.eye(len(c.G)), c.A + ra * torch.eye(len(c.A)))
    else:
        dense_m = torch.kron(c.G, c.A) + c.damped * torch.eye(len(c.G) * len(c.A))
    cols = c.shape[1]
    to_wbar = lambda ts: torch.cat([ts[0], ts[1].unsqueeze(1)], 1).reshape(-1)   # noqa: E731  (row-major Wbar)
    v = torch.randn(c.shape)
    torch.testing.assert_close(c.solve((dense_m @ v.reshape(-1)).reshape(-1, cols)), v, rtol=1e-9, atol=1e-11)
    metric_m = dense_m if metric == "damped" else torch.kron(c.G, c.A)
    ga, gp = to_wbar(terms.g_avg), to_wbar(terms.g_perp)
    assert abs(float(ga @ metric_m @ gp)) < 1e-10 * float(ga @ metric_m @ ga) ** 0.5 * float(gp @ metric_m @ gp) ** 0.5
    other = torch.kron(c.G, c.A) if metric == "damped" else dense_m
    assert abs(float(ga @ other @ gp)) > 1e-6 * float(ga @ other @ ga) ** 0.5 * float(gp @ other @ gp) ** 0.5
    assert terms.beta != 0.0                                             # D does not vanish with M in (F.2)


def test_damped_metric_needs_a_damped_mv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "shampoo", "fop", fop_metric="damped", ema_decay=0.0)
    F.cross_entropy(model(torch.randn(10, 5)), torch.randint(0, 3, (10,))).backward()
    with pytest.raises(ValueError, match="fop_metric='undamped'"):
        opt.step()
    with pytest.raises(ValueError, match="fop_metric"):
        curvlab.optimizer(model, "kfac", "fop", fop_metric="both")
