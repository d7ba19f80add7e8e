"""ISAAC (Petersen et al., ICLR 2023; ALGORITHMS.md 6 and 7.2 item 9) against independent dense references.

Every reference here is built in the test from autograd and explicit linear algebra (``torch.linalg.solve``,
explicit patch slicing), never from curvlab's own statistics. float64 throughout (except the numerics test).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import exact
from helpers import assert_close

LAM = 0.7
LR = 0.3


def forward_record(model: nn.Sequential, x: torch.Tensor):
    """Plain forward through a Sequential: inputs and (grad-retaining) outputs of every Linear / Conv2d."""
    inputs, outputs, h = {}, {}, x
    for name, m in model.named_children():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            inputs[name] = h.detach()
            h = m(h)
            h.retain_grad()
            outputs[name] = h
        else:
            h = m(h)
    return h, inputs, outputs


def official_zeta(x: torch.Tensor, gout: torch.Tensor, lam: float) -> torch.Tensor:
    """eq. I.6: ``lambda_a Gout^T (lambda_a I_b + X X^T / b)^{-1} X`` (Gout of the MEAN loss)."""
    b = x.shape[0]
    return lam * gout.T @ torch.linalg.solve(lam * torch.eye(b) + x @ x.T / b, x)


def one_step(model: nn.Module, x, y, loss=F.cross_entropy, **hyper):
    """Deltas of every parameter after one ISAAC step, and the optimizer."""
    opt = curvlab.optimizer(model, "isaac", "natural", **hyper)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss(model(x), y).backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, opt


def unit(opt, name: str):
    return next(u for u in opt.units if u.name == name)


def close(actual, expected, what, rtol=1e-10):
    assert_close(actual, expected, rtol=rtol, atol=1e-12 * max(float(expected.abs().max()), 1.0), what=what)


@pytest.mark.parametrize("b", [5, 10, 40])
def test_official_step_without_bias(b, float64):
    """One step moves W by exactly ``-lr * zeta*`` (eq. I.6), in both branches (n = 12 and 9)."""
    torch.manual_seed(b)
    model = nn.Sequential(nn.Linear(12, 9, bias=False), nn.Tanh(), nn.Linear(9, 4, bias=False))
    x, y = torch.randn(b, 12), torch.randint(0, 4, (b,))
    ref = copy.deepcopy(model)
    out, ins, outs = forward_record(ref, x)
    F.cross_entropy(out, y).backward()
    deltas, opt = one_step(model, x, y, lr=LR, damping=LAM, momentum=0.0)
    for name, n_in in (("0", 12), ("2", 9)):
        expected = -LR * official_zeta(ins[name], outs[name].grad, LAM)
        close(deltas[f"{name}.weight"], expected, f"layer {name} step (b={b})")
        assert unit(opt, name).curvature.branch == ("woodbury" if b < n_in else "direct")


@pytest.mark.parametrize("bias", ["plain", "homogeneous"])
@pytest.mark.parametrize("b", [5, 40])
def test_forced_branches_agree(b, bias, float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4))
    x, y = torch.randn(b, 12), torch.randint(0, 4, (b,))
    runs = {br: one_step(copy.deepcopy(model), x, y, lr=LR, damping=LAM, isaac_branch=br, isaac_bias=bias)
            for br in ("auto", "woodbury", "direct")}
    for name in runs["auto"][0]:
        close(runs["woodbury"][0][name], runs["direct"][0][name], f"{name}: woodbury vs direct", rtol=1e-9)
        close(runs["auto"][0][name], runs["direct"][0][name], f"{name}: auto vs direct", rtol=1e-9)
    assert unit(runs["woodbury"][1], "0").curvature.branch == "woodbury"
    assert unit(runs["direct"][1], "0").curvature.branch == "direct"


def test_large_damping_recovers_the_gradient_and_plain_bias_is_untouched(float64):
    """eq. I.4: lambda_a -> inf gives grad_W; the plain bias gradient is never preconditioned."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4))
    x, y = torch.randn(7, 12), torch.randint(0, 4, (7,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for lam, lo, hi in ((1e8, 1e-10, 1e-6), (1.0, 1e-2, 1.0)):
        deltas, _ = one_step(copy.deepcopy(model), x, y, lr=LR, damping=lam)
        for name, g in grads.items():
            rel = float((deltas[name] / -LR - g).norm() / g.norm())
            if name.endswith("bias"):
                close(deltas[name], -LR * g, f"{name} at lambda_a={lam}")
            else:
                assert lo < rel < hi, f"{name}: relative difference to the gradient {rel:.3g} at lambda_a={lam}"


def test_input_gradient_and_parameter_gradients_are_unchanged(float64):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 5, (6,))

    def grads(m):
        xi = x.clone().requires_grad_(True)
        F.cross_entropy(m(xi), y).backward()
        return xi.grad, [p.grad.clone() for p in m.parameters()]

    x_ref, p_ref = grads(copy.deepcopy(model))
    opt = curvlab.optimizer(model, "isaac", "natural", lr=LR, damping=LAM)
    x_got, p_got = grads(model)
    assert torch.equal(x_got, x_ref), "the gradient w.r.t. the model input changed with ISAAC attached"
    for p, g, r in zip(model.parameters(), p_got, p_ref):
        assert torch.equal(g, r), "p.grad changed with ISAAC attached"
    opt.step()
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), p_ref)), "opt.step() modified p.grad"


@pytest.mark.parametrize("bias", [False, True])
def test_last_layer_mse_is_the_gauss_newton_step(bias, float64):
    """Theorem 4: for an MSE last layer, ISAAC's curvature is the exact GGN block up to the loss scale.

    ``F.mse_loss`` has ``l_n = ||f_n - y_n||^2 / D``, so ``H_n = (2/D) I`` and ``GGN = c I (x) X^T X / N`` with
    ``c = 2/D``; hence ``zeta* = lambda_a (GGN/c + lambda_a I)^{-1} g = lambda_a c (GGN + c lambda_a I)^{-1} g``.
    With a bias, ``isaac_bias="homogeneous"`` (the ones column in X) is the reading for which this holds."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=bias))
    x, y = torch.randn(9, 6), torch.randn(9, 3)
    c = 2.0 / 3
    ggn = exact.exact_blocks("ggn", model, x, y, loss="mse", modules=["0", "2"])
    ref = copy.deepcopy(model)
    F.mse_loss(ref(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in ref[2].parameters()])
    deltas, opt = one_step(model, x, y, loss=F.mse_loss, lr=LR, damping=LAM, isaac_bias="homogeneous")
    blocks = opt.blocks()
    close(blocks["2"] * c, ggn["2"], "ISAAC block * 2/D vs exact GGN block of the last layer")
    expected = -LR * LAM * c * torch.linalg.solve(ggn["2"] + c * LAM * torch.eye(len(g)), g)
    got = torch.cat([deltas[f"2.{n}"].reshape(-1) for n, _ in ref[2].named_parameters()])
    close(got, expected, "last-layer step vs damped Gauss-Newton step")
    hidden = (blocks["0"] * c - ggn["0"]).norm() / ggn["0"].norm()
    assert hidden > 1e-2, "the hidden layer block should NOT be the exact GGN (guards a vacuous oracle)"


def patches(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """im2col by explicit slicing: ``(N * H_out * W_out, c_in * k * k)``, locations row-major per example."""
    xp = F.pad(x, (pad, pad, pad, pad))
    h_out = (xp.shape[2] - k) // stride + 1
    w_out = (xp.shape[3] - k) // stride + 1
    return torch.stack([xp[n, :, i * stride:i * stride + k, j * stride:j * stride + k].reshape(-1)
                        for n in range(x.shape[0]) for i in range(h_out) for j in range(w_out)])


@pytest.mark.parametrize("bias", ["plain", "homogeneous"])
@pytest.mark.parametrize("average", ["examples", "rows"])
@pytest.mark.parametrize("n_ex", [2, 8])
def test_conv2d_through_unfolding(n_ex, average, bias, float64):
    """X = patches (R = 4 N rows, n = 18 columns; N = 2: Woodbury, N = 8: direct), b = N or N T."""
    torch.manual_seed(n_ex)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(n_ex, 2, 4, 4), torch.randint(0, 4, (n_ex,))
    ref = copy.deepcopy(model)
    out, _, outs = forward_record(ref, x)
    F.cross_entropy(out, y).backward()
    conv = ref[0]
    xr = patches(x, 3, 2, 1)
    gout = outs["0"].grad.permute(0, 2, 3, 1).reshape(-1, 3)
    close(gout.T @ xr, conv.weight.grad.reshape(3, -1), "reference patches reproduce the conv weight gradient")
    gmat = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad.reshape(3, 1)], dim=1)
    if bias == "homogeneous":
        xr = torch.cat([xr, torch.ones(len(xr), 1)], dim=1)
    else:
        gmat = gmat[:, :-1]
    b = n_ex * (4 if average == "rows" else 1)
    step = LAM * torch.linalg.solve(LAM * torch.eye(xr.shape[1]) + xr.T @ xr / b, gmat.T).T
    if bias == "plain":
        step = torch.cat([step, conv.bias.grad.reshape(3, 1)], dim=1)
    deltas, opt = one_step(model, x, y, lr=LR, damping=LAM, isaac_average=average, isaac_bias=bias)
    close(deltas["0.weight"].reshape(3, -1), -LR * step[:, :-1], "conv weight step")
    close(deltas["0.bias"], -LR * step[:, -1], "conv bias step")
    assert unit(opt, "0").curvature.branch == ("woodbury" if 4 * n_ex < xr.shape[1] else "direct")


@pytest.mark.parametrize("d_in", [6, 16])
def test_sequence_input_rows(d_in, float64):
    """A Linear layer on (N, T, d) input: every position is a row of X (R = N T = 12), b = N by default."""
    torch.manual_seed(d_in)
    model = nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))
    x, y = torch.randn(3, 4, d_in), torch.randint(0, 3, (3,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    xr = x.reshape(12, d_in)
    gw = ref[0].weight.grad
    expected = LAM * torch.linalg.solve(LAM * torch.eye(d_in) + xr.T @ xr / 3, gw.T).T
    deltas, opt = one_step(model, x, y, lr=LR, damping=LAM)
    close(deltas["0.weight"], -LR * expected, "sequence layer step")
    close(deltas["0.bias"], -LR * ref[0].bias.grad, "sequence layer bias (plain)")
    assert unit(opt, "0").curvature.branch == ("woodbury" if 12 < d_in else "direct")


@pytest.mark.parametrize("bias, branch, ema", [("plain", "woodbury", False), ("plain", "direct", False),
                                               ("homogeneous", "woodbury", False), ("homogeneous", "auto", True)])
def test_solve_and_mv_match_dense(bias, branch, ema, float64):
    """``solve = lambda_a (C + lambda_a I)^{-1}`` and ``mv = C`` with C = dense(), on arbitrary V."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(7, 10), torch.randint(0, 3, (7,))
    _, opt = one_step(model, x, y, lr=LR, damping=LAM, isaac_bias=bias, isaac_branch=branch, isaac_ema=ema)
    u = unit(opt, "0")
    dense = u.curvature.dense()
    if bias == "plain":
        assert dense[-6:].abs().max() == 0 and dense[:, -6:].abs().max() == 0, "plain bias must have C = 0"
    v = [torch.randn_like(p) for p in u.params]
    flat = torch.cat([t.reshape(-1) for t in v])
    solved = torch.cat([t.reshape(-1) for t in u.solve(v)])
    close(solved, LAM * torch.linalg.solve(dense + LAM * torch.eye(len(flat)), flat), "solve vs dense")
    close(torch.cat([t.reshape(-1) for t in u.mv(v)]), dense @ flat, "mv vs dense")


def test_layers_subset(float64):
    """ISAAC on the middle layer only (paper E3); the others get the first-order fallback."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    ref = copy.deepcopy(model)
    out, ins, outs = forward_record(ref, x)
    F.cross_entropy(out, y).backward()
    deltas, opt = one_step(model, x, y, lr=LR, damping=LAM, layers=["2"])
    assert [u["name"] for u in opt.coverage() if u["preconditioned"]] == ["2"]
    close(deltas["2.weight"], -LR * official_zeta(ins["2"], outs["2"].grad, LAM), "selected layer")
    for name, p in ref.named_parameters():
        if name != "2.weight":
            close(deltas[name], -LR * p.grad, f"{name} (first-order / plain bias)")


@pytest.mark.parametrize("ema", [False, True])
def test_ema_decay_ignored_by_default_and_used_with_isaac_ema(ema, float64):
    torch.manual_seed(6)
    model = nn.Linear(5, 3, bias=False)
    opt = curvlab.optimizer(model, "isaac", "natural", lr=0.01, damping=LAM, ema_decay=0.5, isaac_ema=ema)
    xs = [torch.randn(4, 5), torch.randn(6, 5)]
    for x in xs:
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 3, (len(x),))).backward()
        opt.step()
    a1, a2 = (x.T @ x / len(x) for x in xs)
    a = 0.5 * a1 + 0.5 * a2 if ema else a2
    close(opt.blocks()["Linear"], torch.kron(torch.eye(3), a),
          "dense after two steps")


def test_checkpoint_resumes_between_statistics_steps(float64):
    """With stat_interval=2 the second step reuses the stored inputs and factor: a checkpoint must carry them."""
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    torch.manual_seed(7)
    model, twin = make(), make()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt = curvlab.optimizer(model, "isaac", "natural", lr=LR, damping=LAM, stat_interval=2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    twin.load_state_dict(model.state_dict())
    opt2 = curvlab.optimizer(twin, "isaac", "natural", lr=LR, damping=LAM, stat_interval=2)
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        F.cross_entropy(m(2 * x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": 0.0}, "damping"),
    ({"isaac_ema": True, "isaac_branch": "woodbury"}, "isaac_branch"),
    ({"isaac_branch": "woodbery"}, "woodbury"),
    ({"isaac_bias": "none"}, "isaac_bias"),
])
def test_bad_options_name_the_argument(kwargs, match):
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=match):
        opt = curvlab.optimizer(model, "isaac", "natural", **kwargs)
        F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
        opt.step()


def test_failed_cholesky_falls_back_through_the_ladder(monkeypatch):
    """A float32 Cholesky failure goes through curvlab.linalg's ladder (float64 retry), is reported, and the
    step is still the ISAAC step."""
    torch.manual_seed(8)
    model = nn.Linear(6, 3, bias=False)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    good, _ = one_step(copy.deepcopy(model), x, y, lr=LR, damping=LAM)
    real = torch.linalg.cholesky_ex

    def failing(m, *a, **k):
        chol, info = real(m, *a, **k)
        return (chol, torch.ones_like(info)) if m.dtype == torch.float32 else (chol, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    got, opt = one_step(model, x, y, lr=LR, damping=LAM)
    assert any("float64" in str(e) for e in opt.events), f"no numerics event reported: {opt.events}"
    assert_close(got["weight"], good["weight"], rtol=1e-5, atol=1e-6, what="step after the fallback")
