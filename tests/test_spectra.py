"""curvlab.spectra: dense spectra, matrix-free products and Lanczos against dense float64 references, the
SLQ density, the comparison metrics, and the quick mode of analysis/spectra.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import curvlab
from curvlab import exact, spectra
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")
ROOT = Path(__file__).resolve().parents[1]


def tanh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2), nn.Sigmoid(),
                         nn.Flatten(), nn.Linear(8, 3))


def data(loss: str, n: int = 12, seed: int = 0, d_in: int = 5, d_out: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, d_out, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, d_out, generator=g)
    return x, y


def t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a))


@pytest.mark.parametrize("kind", exact.KINDS)
def test_exact_spectra_match_eigvalsh(kind):
    model = tanh_mlp()
    x, y = data("cross_entropy")
    spec = spectra.exact_spectra(kind, model, x, y)
    mat = exact.exact_matrix(kind, model, x, y)
    ref = {n: torch.linalg.eigvalsh(b).flip(0) for n, b in exact.module_blocks(mat, model).items()}
    ref[spectra.WHOLE] = torch.linalg.eigvalsh(mat).flip(0)
    assert set(spec) == set(ref)
    for name in ref:
        assert_close(spec[name], ref[name], rtol=1e-10, atol=1e-13, what=f"{kind} spectrum {name}")


def test_estimator_spectra_equal_exact_where_kfac_is_exact():
    """Deep linear network, MSE: K-FAC type2 blocks ARE the GGN blocks (ALGORITHMS 7.2), so the spectra agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    x, y = data("mse", n=9, d_out=3)
    est = spectra.estimator_spectra(model, x, y, "kfac", loss="mse", fisher="type2")
    ref = spectra.exact_spectra("ggn", model, x, y, loss="mse", whole=False)
    for name in ref:
        assert_close(est[name], ref[name], rtol=1e-9, atol=1e-12, what=f"kfac spectrum {name}")
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # model left hook-free


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind", exact.KINDS)
def test_matrix_free_products_equal_dense(kind, loss):
    model = tanh_mlp(1)
    x, y = data(loss, seed=1)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(2))
    M = exact.exact_matrix(kind, model, x, y, loss)
    op = spectra.curvature_operator(kind, model, x, y, loss, chunk=5)
    assert_close(t(op @ V.numpy()), M @ V, rtol=1e-10, atol=1e-13, what=f"{kind} operator")
    block = exact.exact_blocks(kind, model, x, y, loss, modules=["2"])["2"]
    opb = spectra.curvature_operator(kind, model, x, y, loss, module="2")
    assert_close(t(opb @ np.eye(opb.shape[0])), block, rtol=1e-10, atol=1e-13, what=f"{kind} block operator")


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_matrix_free_products_on_a_cnn(kind):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 1, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    M = exact.exact_matrix(kind, model, x, y)
    op = spectra.curvature_operator(kind, model, x, y)
    V = torch.randn(M.shape[0], 3, generator=g)
    assert_close(t(op @ V.numpy()), M @ V, rtol=1e-10, atol=1e-13, what=f"cnn {kind} operator")


def test_estimator_operator_equals_dense_block():
    model = tanh_mlp(2)
    x, y = data("cross_entropy", seed=2)
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="type2", ema_decay=0.0)
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.update_curvature()
    for name, block in opt.blocks().items():
        op = spectra.estimator_operator(opt, name)
        assert_close(t(op @ np.eye(op.shape[0])), block, rtol=1e-10, atol=1e-13, what=f"kfac operator {name}")
    with pytest.raises(ValueError, match="no preconditioned unit 'nope'"):
        spectra.estimator_operator(opt, "nope")


@pytest.mark.parametrize("kind,which", [("ggn", "LA"), ("fisher", "LA"), ("empirical", "LA"), ("hessian", "LA"),
                                        ("hessian", "LM")])
def test_lanczos_top_eigenvalues_match_dense(kind, which):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = data("cross_entropy", n=10, seed=3, d_in=4, d_out=3)
    dense = torch.linalg.eigvalsh(exact.exact_matrix(kind, model, x, y))
    if which == "LM":
        dense = dense[dense.abs().argsort()]
    top = spectra.top_eigenvalues(spectra.curvature_operator(kind, model, x, y), k=4, which=which)
    ref = dense[-4:].sort(descending=True).values
    assert_close(t(top), ref, rtol=1e-9, atol=1e-12, what=f"eigsh {kind} {which}")


def test_density_integrates_to_one_and_has_the_right_mean():
    # diagonal operator: Rademacher Hutchinson is exact there, so the SLQ mean must equal trace / n
    d = np.linspace(0.1, 3.0, 50) ** 2
    op = spectra.as_operator(lambda v: torch.as_tensor(d) * v, 50)
    dens = spectra.spectral_density(op, probes=3, steps=20, seed=1)
    grid, rho = dens.density()
    assert abs(np.trapezoid(rho, grid) - 1.0) < 1e-6
    assert abs(dens.mean() - d.mean()) < 1e-12 * d.mean()
    assert abs(np.trapezoid(grid * rho, grid) - d.mean()) < 1e-6
    # full Lanczos recovers every eigenvalue (distinct), each weight 1/n-ish and summing to 1
    full = spectra.spectral_density(op, probes=1, steps=50)
    assert_close(t(np.sort(full.nodes[0])), t(d), rtol=1e-9, atol=1e-12, what="Ritz values")
    assert abs(full.weights[0].sum() - 1.0) < 1e-12
    # the GGN of a model: mean within Hutchinson noise of trace / n
    model = tanh_mlp(4)
    x, y = data("cross_entropy", n=16, seed=4)
    G = exact.ggn(model, x, y)
    dens = spectra.spectral_density(spectra.curvature_operator("ggn", model, x, y), probes=20, steps=25)
    grid, rho = dens.density()
    assert abs(np.trapezoid(rho, grid) - 1.0) < 1e-6
    assert abs(dens.mean() - float(torch.trace(G)) / G.shape[0]) < 0.25 * float(torch.trace(G)) / G.shape[0]


def test_overlap_and_error_metrics():
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    E = Q @ torch.diag(torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])) @ Q.T
    same_space = Q @ torch.diag(torch.tensor([9.0, 8.5, 8.2, 0.5, 0.4, 0.3, 0.2, 0.1])) @ Q.T
    assert abs(spectra.subspace_overlap(same_space, E, k=3) - 1.0) < 1e-12
    flipped = Q @ torch.diag(torch.tensor([1.0, 2, 3, 9, 8, 7, 0.5, 0.4])) @ Q.T   # top-3 = Q[:, 3:6]
    assert abs(spectra.subspace_overlap(flipped, E, k=3)) < 1e-12
    half = Q @ torch.diag(torch.tensor([9.0, 1, 2, 8, 0.5, 0.4, 0.3, 0.2])) @ Q.T  # shares 1 of 2 directions
    assert abs(spectra.subspace_overlap(half, E, k=2) - 0.5) < 1e-12
    angles = spectra.principal_angles(Q[:, :2], Q[:, [0, 3]])
    assert_close(t(angles), torch.tensor([0.0, np.pi / 2]), atol=1e-7, what="principal angles")
    c = spectra.compare(3 * E, E, k=4)
    assert abs(c["rel_frobenius"] - 2.0) < 1e-12 and c["rel_frobenius_fitted"] < 1e-12
    assert_close(t(np.array(c["top_eig_rel_error"])), torch.full((4,), 2.0), what="top eig error")
    assert abs(c["overlap"] - 1.0) < 1e-12
    with pytest.raises(ValueError, match="same shape"):
        spectra.compare(E, E[:4, :4])
    with pytest.raises(ValueError, match="k must be"):
        spectra.subspace_overlap(E, E, k=9)


def test_bad_arguments_are_named():
    model = tanh_mlp()
    x, y = data("cross_entropy")
    with pytest.raises(ValueError, match="no module named 'nope'"):
        spectra.curvature_operator("ggn", model, x, y, module="nope")
    with pytest.raises(ValueError, match="unknown kind"):
        spectra.curvature_operator("gnn", model, x, y)
    with pytest.raises(ValueError, match="k must be"):
        spectra.top_eigenvalues(spectra.curvature_operator("ggn", model, x, y), k=100)


def test_along_training_records_checkpoints():
    model = tanh_mlp(6)
    batches = [data("cross_entropy", n=8, seed=s) for s in range(4)]
    recs = spectra.along_training(model, batches, data("cross_entropy", n=10, seed=9), [0, 2, 4], "kfac",
                                  lr=0.1, damping=0.1)
    assert [r["step"] for r in recs] == [0, 2, 4] and "running" not in recs[0] and "running" in recs[1]
    assert set(recs[1]["fresh"]) == {"0", "2"} and 0.0 <= recs[2]["fresh"]["0"]["overlap"] <= 1.0 + 1e-12
    assert recs[0]["probe_loss"] != recs[2]["probe_loss"]


def test_analysis_quick_mode_writes_its_files(tmp_path):
    sys.path.insert(0, str(ROOT / "analysis"))
    try:
        import spectra as script
    finally:
        sys.path.pop(0)
    assert script.__file__.endswith("analysis/spectra.py")
    script.main(["--quick", "--out", str(tmp_path), "--k", "3"])
    for stem in ("spectra", "top_eigs", "table", "density", "training"):
        for model in ("mlp", "cnn"):
            for ext in ("png", "pdf"):
                assert (tmp_path / f"{stem}_{model}.{ext}").stat().st_size > 0
    res = json.loads((tmp_path / "spectra.json").read_text())
    for model in ("mlp", "cnn"):
        assert set(res[model]["estimators"]) == set(curvlab.ESTIMATORS.names())
        for r in res[model]["lanczos"].values():
            assert r["max_rel_error"] < 1e-8
        assert abs(res[model]["density"]["ggn"]["integral"] - 1.0) < 1e-3
