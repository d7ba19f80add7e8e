"""K-FAC / KFC against the exact torch.func matrices on the cases where the approximation is exact
(ALGORITHMS.md 7.2 items 1-4). float64 throughout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import exact
from helpers import assert_blocks_close, assert_close, one_step_blocks



pytestmark = pytest.mark.usefixtures("float64")


def deep_linear(bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Linear(4, 6, bias=bias), nn.Linear(6, 3, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [1, 7, 40])
def test_type2_equals_ggn_for_deep_linear_mse(n, bias):
    model = deep_linear(bias)
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)
    blocks, _ = one_step_blocks(model, x, y, loss="mse", fisher="type2")
    assert_blocks_close(blocks, exact.exact_blocks("ggn", model, x, y, loss="mse", modules=list(blocks)))


def tanh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 4))


def test_type2_equals_ggn_for_cross_entropy_single_datum():
    model = tanh_mlp()
    x, y = torch.randn(1, 5), torch.tensor([2])
    blocks, _ = one_step_blocks(model, x, y, fisher="type2")
    assert_blocks_close(blocks, exact.exact_blocks("ggn", model, x, y, modules=list(blocks)))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_empirical_equals_empirical_fisher_single_datum(loss):
    model = tanh_mlp(1)
    x = torch.randn(1, 5)
    y = torch.tensor([1]) if loss == "cross_entropy" else torch.randn(1, 4)
    blocks, _ = one_step_blocks(model, x, y, loss=loss, fisher="empirical")
    assert_blocks_close(blocks, exact.exact_blocks("empirical", model, x, y, loss=loss, modules=list(blocks)))


def test_type2_is_not_exact_for_a_nonlinear_batch():
    """Guard against a vacuous oracle: with N > 1 and a nonlinearity the blocks must differ."""
    model = tanh_mlp()
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    blocks, _ = one_step_blocks(model, x, y, fisher="type2")
    ref = exact.exact_blocks("ggn", model, x, y, modules=list(blocks))
    assert (blocks["0"] - ref["0"]).norm() / ref["0"].norm() > 1e-3


def test_kfc_with_full_kernel_equals_kfac_linear():
    """ALGORITHMS 7.2 item 2: a Conv2d whose kernel covers the whole input (|T| = 1) is a Linear layer."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(5, 3))
    lin = nn.Sequential(nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        lin[1].weight.copy_(conv[0].weight.reshape(5, 18))
        lin[1].bias.copy_(conv[0].bias)
        lin[3].load_state_dict(conv[3].state_dict())
    x, y = torch.randn(9, 2, 3, 3), torch.randint(0, 3, (9,))
    bc, _ = one_step_blocks(conv, x, y, fisher="type2")
    bl, _ = one_step_blocks(lin, x, y, fisher="type2")
    assert_close(bc["0"], bl["1"], what="conv block vs linear block")
    assert_close(bc["3"], bl["3"], what="head block")


def test_kfc_exact_for_deep_linear_conv_net_with_full_kernels():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 1), nn.Flatten())
    x, y = torch.randn(11, 2, 3, 3), torch.randn(11, 3)
    blocks, _ = one_step_blocks(model, x, y, loss="mse", fisher="type2")
    assert_blocks_close(blocks, exact.exact_blocks("ggn", model, x, y, loss="mse", modules=list(blocks)))


def test_kfc_statistics_by_hand_with_padding_and_stride():
    """Omega = (1/N) sum_{n,t} abar abar^T and Gamma = (1/(N T)) sum g g^T (eq. C.4), zero padding included."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten())
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 27)
    _, opt = one_step_blocks(model, x, y, loss="mse", fisher="empirical")
    curv = opt.units[0].curvature
    patches = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2)      # (N, T, 18)
    abar = torch.cat([patches, torch.ones(4, 9, 1)], dim=2).reshape(-1, 19)
    assert_close(curv.A, abar.T @ abar / 4, what="Omega")
    out = model[0](x)
    grad_out = 2.0 * (out.flatten(1) - y) / y.numel()                                      # dL/ds, mean MSE
    g = (4 * grad_out).reshape(4, 3, 9).transpose(1, 2).reshape(-1, 3)
    assert_close(curv.G, g.T @ g / (4 * 9), what="Gamma")


def test_blocks_ordering_weight_then_bias():
    """blocks() indexes torch.cat([weight.reshape(-1), bias]): entry (o*d_in+i, o2*d_in+i2) = G[o,o2] A[i,i2]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    blocks, opt = one_step_blocks(model, x, y, loss="mse", fisher="empirical")
    curv = opt.units[0].curvature
    A, G, B = curv.A, curv.G, blocks["0"]
    for o in range(2):
        for i in range(3):
            for o2 in range(2):
                for i2 in range(3):
                    assert B[o * 3 + i, o2 * 3 + i2] == pytest.approx(float(G[o, o2] * A[i, i2]), abs=1e-14)
            for o2 in range(2):
                assert B[o * 3 + i, 6 + o2] == pytest.approx(float(G[o, o2] * A[i, 3]), abs=1e-14)
    assert_close(B[6:, 6:], G * A[3, 3], what="bias-bias block")
    assert float(A[3, 3]) == pytest.approx(1.0)


def test_mc_factors_approach_type2_as_samples_grow():
    """E over sampled labels of the MC output factor G is the type-2 (exact GGN) factor (7.2 item 4).
    The error must shrink roughly like 1/sqrt(samples); seeded."""
    model = tanh_mlp(2)
    x, y = torch.randn(24, 5), torch.randint(0, 4, (24,))
    _, exact_opt = one_step_blocks(model, x, y, fisher="type2")
    errors = []
    for k in (4, 64, 1024):
        _, opt = one_step_blocks(model, x, y, fisher="mc", mc_samples=k, seed=k)
        for ue, um in zip(exact_opt.units, opt.units):
            assert_close(um.curvature.A, ue.curvature.A, what=f"A factor of {ue.name} (independent of labels)")
        errs = [float((um.curvature.G - ue.curvature.G).norm() / ue.curvature.G.norm())
                for ue, um in zip(exact_opt.units, opt.units)]
        errors.append(max(errs))
    print("relative error of MC G factor vs type-2 for 4/64/1024 samples:", errors)
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 5.0          # sqrt(256) = 16 expected; 5 leaves room for noise
    assert errors[2] < 0.08
