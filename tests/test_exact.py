"""Tests of curvlab.exact against independent references (float64, tight tolerances)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab import exact

DT = torch.float64
N, DIN, HID, C = 6, 3, 4, 3


def assert_close(actual, expected, atol=1e-12, rtol=0.0, what="matrix"):
    """Elementwise |a - e| <= atol + rtol |e|; on failure report the worst entry and its index."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    excess = diff - (atol + rtol * expected.abs())
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{what}: max abs diff {diff.max().item():.3e} (atol {atol:.1e}, rtol {rtol:.1e}); worst at {idx}: "
            f"actual {actual[idx].item():.17g}, expected {expected[idx].item():.17g}; "
            f"{int((excess > 0).sum())} of {excess.numel()} entries out of tolerance")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIN, HID), nn.Tanh(), nn.Linear(HID, C)).to(DT)


def data(loss, n=N, seed=1, dout=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIN, generator=g, dtype=DT)
    y = torch.randint(0, dout, (n,), generator=g) if loss == "cross_entropy" else \
        torch.randn(n, dout, generator=g, dtype=DT)
    return x, y


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def mlp_forward(model, flat, x):
    """Hand-written forward of `mlp()` from a flat vector (independent of torch.func)."""
    sizes = [p.numel() for p in model.parameters()]
    w1, b1, w2, b2 = flat.split(sizes)
    h = torch.tanh(x @ w1.view(HID, DIN).T + b1)
    return h @ w2.view(C, HID).T + b2


def lossfn(loss):
    return F.cross_entropy if loss == "cross_entropy" else F.mse_loss


LOSSES = ["cross_entropy", "mse"]


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_equals_true_fisher(loss):
    model = mlp()
    x, y = data(loss)
    G = exact.ggn(model, x, y, loss)
    Fm = exact.fisher(model, x, loss)
    assert G.dtype == DT and G.shape == (31, 31)
    assert G.abs().max() > 1e-3  # not trivially zero
    assert_close(Fm, G, atol=1e-12, what=f"Fisher vs GGN ({loss})")


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_fisher_matches_autograd_loop(loss):
    model = mlp()
    x, y = data(loss)
    params = [p for p in model.parameters()]
    ref = torch.zeros(31, 31, dtype=DT)
    for n in range(N):
        ln = lossfn(loss)(model(x[n:n + 1]), y[n:n + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ln, params)])
        ref += torch.outer(g, g) / N
    assert_close(exact.empirical_fisher(model, x, y, loss), ref, atol=1e-13, what=f"empirical Fisher ({loss})")
    assert_close(exact.exact_matrix("empirical", model, x, y, loss), ref, atol=1e-13, what="exact_matrix")


@pytest.mark.parametrize("loss", LOSSES)
def test_hessian_matches_autograd_functional(loss):
    model = mlp()
    x, y = data(loss)
    ref = torch.autograd.functional.hessian(lambda t: lossfn(loss)(mlp_forward(model, t, x), y), flat_params(model))
    H = exact.hessian(model, x, y, loss)
    assert_close(H, ref, atol=1e-12, what=f"Hessian ({loss})")
    # positive control: the nonlinear net has a residual term, so GGN and Hessian must differ here
    assert (exact.ggn(model, x, y, loss) - H).abs().max() > 1e-4


def test_ggn_equals_hessian_for_linear_model_mse():
    torch.manual_seed(3)
    model = nn.Linear(DIN, 2).to(DT)
    x, y = data("mse", dout=2)
    assert_close(exact.ggn(model, x, y, "mse"), exact.hessian(model, x, y, "mse"), atol=1e-12,
                 what="GGN vs Hessian, linear model + MSE")
    ref = torch.autograd.functional.hessian(
        lambda t: F.mse_loss(x @ t[:2 * DIN].view(2, DIN).T + t[2 * DIN:], y), flat_params(model))
    assert_close(exact.ggn(model, x, y, "mse"), ref, atol=1e-12, what="GGN vs autograd Hessian")


def test_ggn_single_datum_by_hand_cross_entropy():
    model = mlp()
    x, y = data("cross_entropy", n=1)
    theta = flat_params(model)
    J = torch.autograd.functional.jacobian(lambda t: mlp_forward(model, t, x)[0], theta)  # (C, P)
    p = torch.softmax(mlp_forward(model, theta, x)[0], dim=0)
    ref = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    assert_close(exact.ggn(model, x, y), ref, atol=1e-13, what="GGN, one datum, CE")


def test_ggn_mse_by_hand_batch():
    model = mlp()
    x, y = data("mse", n=3)
    theta = flat_params(model)
    ref = torch.zeros(31, 31, dtype=DT)
    for n in range(3):
        J = torch.autograd.functional.jacobian(lambda t: mlp_forward(model, t, x[n:n + 1])[0], theta)
        ref += J.T @ J * (2.0 / C) / 3
    assert_close(exact.ggn(model, x, y, "mse"), ref, atol=1e-13, what="GGN, MSE, (2/D) J^T J")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical", "hessian"])
def test_symmetric_and_psd(kind, loss):
    model = mlp()
    x, y = data(loss)
    M = exact.exact_matrix(kind, model, x, y, loss)
    scale = M.abs().max()
    assert scale > 0
    assert_close(M, M.T, atol=1e-14 * scale, what=f"{kind} symmetry")
    if kind != "hessian":
        ev = torch.linalg.eigvalsh(M)
        assert ev.min() >= -1e-10 * ev.max(), f"{kind} ({loss}) not PSD: min eig {ev.min():.3e}, max {ev.max():.3e}"


def conv_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5),
                         nn.Tanh(), nn.Linear(5, 3, bias=False)).to(DT)


def test_parameter_layout_consistent_with_named_parameters():
    model = conv_model()
    layout = exact.parameter_layout(model)
    named = list(model.named_parameters())
    assert [f"{m}.{p}" for m, p, _ in layout] == [n for n, _ in named]
    start = 0
    for (_, _, sl), (name, p) in zip(layout, named):
        assert (sl.start, sl.stop) == (start, start + p.numel()), name
        start = sl.stop
    model[3].bias.requires_grad_(False)
    assert [f"{m}.{p}" for m, p, _ in exact.parameter_layout(model)] == ["0.weight", "0.bias", "3.weight", "5.weight"]
    assert exact.parameter_layout(nn.Linear(2, 2))[1] == ("", "bias", slice(4, 6))


def test_module_blocks_keys_shapes_and_values():
    model = conv_model()
    torch.manual_seed(7)
    x, y = torch.randn(4, 2, 4, 4, dtype=DT), torch.tensor([0, 2, 1, 2])
    M = exact.ggn(model, x, y)
    assert M.shape == (57 + 65 + 15,) * 2
    blocks = exact.module_blocks(M, model)
    assert list(blocks) == ["0", "3", "5"]
    assert {k: tuple(v.shape) for k, v in blocks.items()} == {"0": (57, 57), "3": (65, 65), "5": (15, 15)}
    for name, (s, e) in {"0": (0, 57), "3": (57, 122), "5": (122, 137)}.items():
        assert_close(blocks[name], M[s:e, s:e], atol=0, what=f"block {name}")
    eb = exact.exact_blocks("ggn", model, x, y, modules=["5", "0"])
    assert list(eb) == ["5", "0"]
    assert_close(eb["5"], blocks["5"], atol=1e-14, what="exact_blocks")
    # a sub-vector of parameters gives the corresponding sub-block
    sub = exact.ggn(model, x, y, params=["3.weight", "3.bias"])
    assert_close(sub, M[57:122, 57:122], atol=1e-13, what="params subset")
    with pytest.raises(ValueError, match="nope"):
        exact.module_blocks(M, model, modules=["nope"])
    with pytest.raises(ValueError, match="'3'"):
        exact.exact_blocks("ggn", model, x, y, modules=["1"])  # Tanh owns no parameters; message lists valid ones
    with pytest.raises(ValueError, match="shape"):
        exact.module_blocks(M[:-1, :-1], model)


def test_frozen_parameters_and_eval_batchnorm():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(DIN, HID), nn.BatchNorm1d(HID), nn.Tanh(), nn.Linear(HID, C)).to(DT)
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    model[0].bias.requires_grad_(False)
    x, y = data("cross_entropy")
    G = exact.ggn(model, x, y)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert G.shape == (P, P)
    assert_close(exact.fisher(model, x), G, atol=1e-12, what="Fisher vs GGN, eval BatchNorm")
    params = [p for p in model.parameters() if p.requires_grad]
    ref = torch.zeros(P, P, dtype=DT)
    for n in range(N):
        ln = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ln, params)])
        ref += torch.outer(g, g) / N
    assert_close(exact.empirical_fisher(model, x, y), ref, atol=1e-13, what="empirical Fisher, eval BatchNorm")
    assert set(exact.module_blocks(G, model)) == {"0", "1", "3"}
    assert exact.module_blocks(G, model)["0"].shape == (DIN * HID,) * 2


def test_hooks_are_not_run_and_model_untouched():
    model = mlp()
    x, y = data("cross_entropy")
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model[2].register_full_backward_hook(lambda m, gi, go: calls.append(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in exact.KINDS:
        exact.exact_matrix(kind, model, x, y)
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(model[0]._forward_hooks) == 1 and len(model[2]._backward_hooks) == 1
    model(x).sum().backward()
    assert calls == [1, 2]


def test_backpack_extended_model():
    backpack = pytest.importorskip("backpack")
    model = mlp()
    x, y = data("cross_entropy")
    ref = exact.ggn(model, x, y)
    ext = backpack.extend(mlp())
    for kind in exact.KINDS:
        exact.exact_matrix(kind, ext, x, y)
    assert_close(exact.ggn(ext, x, y), ref, atol=0, what="GGN on a BackPACK-extended model")


def test_errors():
    model = mlp()
    x, y = data("cross_entropy")
    with pytest.raises(ValueError, match="bogus"):
        exact.exact_matrix("bogus", model, x, y)
    with pytest.raises(ValueError, match="hinge"):
        exact.exact_matrix("ggn", model, x, y, loss="hinge")
    for fn in (exact.ggn, exact.empirical_fisher, exact.hessian):
        with pytest.raises(ValueError, match="hinge"):
            fn(model, x, y, loss="hinge")
    with pytest.raises(ValueError, match="hinge"):
        exact.fisher(model, x, loss="hinge")
    with pytest.raises(ValueError, match="batch sizes"):
        exact.ggn(model, x, y[:-1])
    with pytest.raises(ValueError, match="integer class labels"):
        exact.ggn(model, x, y.to(DT))
    with pytest.raises(ValueError, match="integer class labels"):
        exact.hessian(model, x, y[:, None])
    with pytest.raises(ValueError, match="class labels must lie"):
        exact.empirical_fisher(model, x, torch.full((N,), C))
    with pytest.raises(ValueError, match="mse"):
        exact.ggn(model, x, torch.randn(N, C + 1, dtype=DT), loss="mse")
    with pytest.raises(ValueError, match="targets are required"):
        exact.ggn(model, x, None)
    with pytest.raises(ValueError, match="nope"):
        exact.ggn(model, x, y, params=["nope"])


def test_curvlab_optimizer_hooks_record_nothing():
    import curvlab

    model = mlp()
    x, y = data("cross_entropy")
    ref = exact.ggn(mlp(), x, y)
    opt = curvlab.optimizer(model, estimator="kfac", rule="natural", lr=0.1, damping=1e-3)
    for kind in exact.KINDS:
        exact.exact_matrix(kind, model, x, y)
    assert all(not opt.capture.pop(name) for name in opt.capture.layers)
    assert_close(exact.ggn(model, x, y), ref, atol=0, what="GGN with curvlab hooks installed")
    F.cross_entropy(model(x), y).backward()  # the hooks still work on the model itself
    assert all(len(opt.capture.pop(name)) == 1 for name in opt.capture.layers)
