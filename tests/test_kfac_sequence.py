"""K-FAC with a shared dimension (sequences, several uses of a layer in one forward): ALGORITHMS.md section 11,
Eschenhagen et al., NeurIPS 2023. float64 throughout.

Pins the planned API ``curvlab.optimizer(model, "kfac", "natural", kfac_approx="expand"|"reduce",
loss_terms_per_example=None|int, fisher=..., loss=..., ema_decay=0.0)`` with model outputs ``(N, T, C)``
(cross-entropy, classes last, the user's loss ``F.cross_entropy(out.reshape(-1, C), y.reshape(-1))``) or
``(N, T, D)`` (``F.mse_loss(out, y)``). ``opt.blocks()`` gives the dense K-FAC block per layer.

Every reference is checked inside the test BEFORE curvlab is called, so a failure in a curvlab line is a
curvlab failure: the hand-made factors of :mod:`seq_reference` against the exact GGN of :mod:`curvlab.exact`
where the paper states exactness, against torch.func per-example gradients, against the exact output Hessian,
and against curvlinops (``KFACLinearOperator``, when installed) for the nonlinear models.

Conventions pinned here (see seq_reference's docstring for the equations):

* expand: ``A = mean over (n, r) of abar abar^T``; ``G = 1/(N L) sum_{n,r} sum_v g g^T`` (``L`` loss terms
  per example; with a loss term per position ``L = R`` and G is the mean over (n, r) as well);
* reduce: ``abar_n = mean_r abar``, ``gbar = sum_r g``; ``A = mean_n abar abar^T``; ``G = 1/(N L) sum_n sum_v
  gbar gbar^T``;
* type-2 vectors: the Hessian square root of each loss term, with the columns of one class merged across the
  terms (one backward per class, as curvlinops) -- this only matters for reduce (and for models that mix
  positions) with several loss terms per example;
* ``loss_terms_per_example=L`` says that each example's loss is ``L`` terms of ``R_out / L`` consecutive rows;
  since the user's mean loss is the same function for every such ``L``, type-2 K-FAC keeps its scale (the
  vectors carry each term's share) and only the merging of columns changes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from curvlab import exact
from helpers import assert_blocks_close, assert_close
import seq_reference as ref

pytestmark = [pytest.mark.usefixtures("float64"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]  # curvlinops

N, T, D_IN, C = 4, 3, 4, 3


# -- models ------------------------------------------------------------------------------------------------
def deep_linear_seq(bias: bool, seed: int = 0) -> nn.Module:
    """Position-wise deep linear model on (N, T, d): output (N, T, C)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 5, bias=bias), nn.Linear(5, 4, bias=bias), nn.Linear(4, C, bias=bias))


class MeanPooled(nn.Module):
    """Position-wise layers ``a``, ``b`` (optional tanh after each), mean over T, a head: output (N, C)."""

    def __init__(self, bias: bool = True, act: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(D_IN, 5, bias=bias)
        self.b = nn.Linear(5, 4, bias=bias)
        self.head = nn.Linear(4, C, bias=bias)
        self.act = nn.Tanh() if act else nn.Identity()

    def forward(self, x):
        return self.head(self.act(self.b(self.act(self.a(x)))).mean(dim=1))


class FoldedPositions(nn.Module):
    """Position-wise model whose output folds the positions into the batch: (N, T, d) -> (N*T, C)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out.reshape(-1, out.shape[-1])


class TwiceApplied(nn.Module):
    """``head(tanh(L(tanh(L(x)))))``: one Linear used twice in a forward, (N, d) inputs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.shared = nn.Linear(D_IN, D_IN)
        self.head = nn.Linear(D_IN, C)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class SharedOnTwoInputs(nn.Module):
    """Deep linear ``head(shared(x_u))`` on the two inputs ``x[:, 0]``, ``x[:, 1]`` (both layers used twice):
    ``combine="stack"`` -> output (N, 2, C), a loss per input; ``combine="sum"`` -> ``head(shared(x_0) +
    shared(x_1))``, output (N, C), one loss per example."""

    def __init__(self, combine: str, bias: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.shared = nn.Linear(D_IN, 5, bias=bias)
        self.head = nn.Linear(5, C, bias=bias)
        self.combine = combine

    def forward(self, x):
        if self.combine == "stack":
            return torch.stack([self.head(self.shared(x[:, 0])), self.head(self.shared(x[:, 1]))], dim=1)
        return self.head(self.shared(x[:, 0]) + self.shared(x[:, 1]))


def lm_tanh(seed: int = 0) -> nn.Module:
    """Linear-tanh-Linear on (N, T, d), a loss term per position."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, C))


def data(out_shape: tuple[int, ...], loss: str, seed: int = 1, n: int = N, t: int = T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, D_IN, generator=g)
    if loss == "cross_entropy":
        y = torch.randint(0, C, out_shape[:-1], generator=g)
    else:
        y = torch.randn(out_shape, generator=g)
    return x, y


# -- curvlab side --------------------------------------------------------------------------------------------
def curvlab_blocks(model, x, y, *, loss, fisher="type2", estimator="kfac", **hyper):
    """Blocks and optimizer after one plain forward/backward of the user's loss (ema_decay=0)."""
    opt = curvlab.optimizer(model, estimator, "natural", loss=loss, fisher=fisher, ema_decay=0.0, **hyper)
    try:
        ref.user_loss(loss, model(x), y).backward()
        assert opt.update_curvature(), "update_curvature() refused the statistics"
        return opt.blocks(), opt
    finally:
        opt.capture.remove()
        model.zero_grad()


def linear_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def exact_ggn(model, x, y, loss="mse"):
    return exact.exact_blocks("ggn", model, x, y, loss=loss, modules=linear_names(model))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# == reference self-checks (independent of the planned API; they pass on any branch) ========================
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("terms", [None, 1])
def test_reference_type2_vectors_factor_each_terms_hessian(loss, terms):
    """Within one loss term, sum_v v v^T == N L * d^2 L / d f^2 (the term's Hessian at per-term scale); the
    Hessian has no blocks between terms (what merged columns add there is the merging, not a Hessian)."""
    out_shape = (N, T, C)
    _, y = data(out_shape, loss)
    f = torch.randn(out_shape, generator=torch.Generator().manual_seed(5))
    vecs, num_terms = ref.output_vectors(loss, "type2", f, y, terms)
    L = T if terms is None else terms
    assert num_terms == N * L
    hess = torch.func.jacrev(torch.func.jacrev(lambda o: ref.user_loss(loss, o, y)))(f).reshape(N, T * C, N, T * C)
    m = T // L
    for n in range(N):
        outer = sum(torch.outer(v[n].reshape(-1), v[n].reshape(-1)) for v in vecs)
        for k in range(L):
            sl = slice(k * m * C, (k + 1) * m * C)
            assert_close(outer[sl, sl], num_terms * hess[n, sl, n, sl], what=f"term {k} of example {n}")
        other = [i for i in range(T * C) if i // (m * C) != 0]
        if other:
            assert float(hess[n, :m * C, n, other].abs().max()) == 0.0


def test_reference_per_example_grads_sum_over_uses():
    """Per-example gradients from the recorded uses == torch.func per-example gradients (weight sharing)."""
    model = TwiceApplied()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, D_IN, generator=g), torch.randint(0, C, (N,), generator=g)
    per = ref.per_example_grads(model, x, y, loss="cross_entropy", layer="shared")
    E = exact.exact_blocks("empirical", model, x, y, loss="cross_entropy", modules=["shared"])["shared"]
    assert_close(per.T @ per / N, E, what="(1/N) sum_n grad l_n grad l_n^T of the shared layer")


def test_reference_guards_are_not_vacuous():
    """Each approximation is exact only in its own setting: reduce is not exact with a loss per position, expand
    not after mean pooling, neither on a nonlinear model."""
    model = deep_linear_seq(True)
    x, y = data((N, T, C), "mse")
    ggn = exact_ggn(model, x, y)
    red = ref.reference_blocks(model, x, y, loss="mse", approx="reduce")
    assert min(rel(red[k], ggn[k]) for k in ggn) > 0.05
    pooled = MeanPooled()
    x, y = data((N, C), "mse")
    ggn = exact_ggn(pooled, x, y)
    exp = ref.reference_blocks(pooled, x, y, loss="mse", approx="expand")
    assert min(rel(exp[k], ggn[k]) for k in ("a", "b")) > 0.05
    lm = lm_tanh()
    x, y = data((N, T, C), "mse")
    ggn = exact_ggn(lm, x, y)
    exp = ref.reference_blocks(lm, x, y, loss="mse", approx="expand")
    assert rel(exp["0"], ggn["0"]) > 1e-3


# == (a) expand is exact for a deep linear model with a loss term per position ==============================
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,t", [(1, 5), (4, 3), (6, 1)])
def test_expand_equals_ggn_for_deep_linear_mse_on_every_position(bias, n, t):
    model = deep_linear_seq(bias)
    x, y = data((n, t, C), "mse", n=n, t=t)
    ggn = exact_ggn(model, x, y)
    assert_blocks_close(ref.reference_blocks(model, x, y, loss="mse", approx="expand"), ggn)   # the paper's claim
    blocks, _ = curvlab_blocks(model, x, y, loss="mse", kfac_approx="expand")
    assert_blocks_close(blocks, ggn)


def test_expand_factors_are_means_over_examples_and_positions():
    """With a loss term per position: A = mean_{n,r} abar abar^T and G = mean_{n,r} sum_v g g^T (per-term g),
    not main's split (A summed over positions, G from per-EXAMPLE vectors over N T), which is T x / T apart."""
    model = deep_linear_seq(True)
    x, y = data((N, T, C), "mse")
    factors = ref.reference_blocks(model, x, y, loss="mse", approx="expand", factors=True)
    abar = torch.cat([x, torch.ones(N, T, 1)], dim=-1).reshape(-1, D_IN + 1)
    assert_close(factors["0"][0], abar.T @ abar / (N * T), what="A of layer 0 by hand")
    B = model[2].weight @ model[1].weight                       # d f / d s_0, the same at every position
    assert_close(factors["0"][1], 2.0 / C * B.T @ B, what="G of layer 0 by hand (H = 2/C I per position)")
    _, opt = curvlab_blocks(model, x, y, loss="mse", kfac_approx="expand")
    units = {u.name: u.curvature for u in opt.units}
    for name, (A, G) in factors.items():
        assert_close(units[name].A, A, what=f"A of layer {name}")
        assert_close(units[name].G, G, what=f"G of layer {name}")


@pytest.mark.parametrize("t", [1, 4])
def test_expand_exact_when_the_model_folds_positions_into_the_batch(t):
    """The issue "K-FAC block is T times the exact GGN": a position-wise model returning (N*T, C) (the layers see
    (N, T, d), the loss has N*T terms). Normalising G by the layer's N instead of the number of loss terms
    gives T x the GGN on main. Exact GGN from a twin returning (N, T, C): the same function of the parameters."""
    net = deep_linear_seq(True)
    folded = FoldedPositions(net)
    x, y = data((N, t, C), "mse", t=t)
    ggn = exact_ggn(net, x, y)
    want = {"net." + k: v for k, v in ggn.items()}
    y_folded = y.reshape(-1, C)
    assert_blocks_close(ref.reference_blocks(folded, x, y_folded, loss="mse", approx="expand"), want)
    blocks, _ = curvlab_blocks(folded, x, y_folded, loss="mse", kfac_approx="expand")
    assert_blocks_close(blocks, want)


def test_expand_folded_cross_entropy_matches_curvlinops():
    """The same fold for cross-entropy, the only way to train a sequence model with CE on main (it rejects
    (N, T, C) logits): main gives T x curvlinops' expand block (measured 3.0000 for T = 3)."""
    model = FoldedPositions(lm_tanh())
    x, y = data((N, T, C), "cross_entropy")
    y_folded = y.reshape(-1)
    want = ref.reference_blocks(model, x, y_folded, loss="cross_entropy", approx="expand")
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        pass
    else:
        assert_blocks_close(want, curvlinops_blocks(model, x, y_folded, loss="cross_entropy", fisher="type2",
                                                    approx="expand", terms=T))
    blocks, _ = curvlab_blocks(model, x, y_folded, loss="cross_entropy", kfac_approx="expand")
    assert_blocks_close(blocks, want)


# == (b) reduce is exact for a deep linear model that aggregates the positions linearly =====================
@pytest.mark.parametrize("bias", [True, False])
def test_reduce_equals_ggn_for_deep_linear_mean_pooled_model(bias):
    model = MeanPooled(bias)
    x, y = data((N, C), "mse")
    ggn = exact_ggn(model, x, y)
    assert_blocks_close(ref.reference_blocks(model, x, y, loss="mse", approx="reduce"), ggn)
    blocks, _ = curvlab_blocks(model, x, y, loss="mse", kfac_approx="reduce")
    assert_blocks_close(blocks, ggn)


# == (c) nonlinear models: curvlinops' KFACLinearOperator and the hand-made reference ========================
# (name, model builder, output shape, loss, loss terms per example)
NONLINEAR = {
    "lm-ce": (lm_tanh, (N, T, C), "cross_entropy", T),
    "lm-mse": (lm_tanh, (N, T, C), "mse", T),
    "pooled-ce": (lambda: MeanPooled(act=True, seed=3), (N, C), "cross_entropy", 1),
}
NONLINEAR_CASES = [(m, f, a) for m in NONLINEAR for f in ("type2", "empirical") for a in ("expand", "reduce")
                   if not (m == "lm-mse" and f == "empirical")]   # curvlinops scales MSE's empirical G by C


class _ClassesSecond(nn.Module):
    """curvlinops reads cross-entropy outputs as (N, C, ...) (``rearrange("batch c ... -> (batch ...) c")``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).movedim(-1, 1)


def curvlinops_blocks(model, x, y, *, loss, fisher, approx, terms):
    """Dense KFACLinearOperator (bias folded into A: separate_weight_and_bias=False) cut into module blocks."""
    from curvlinops import KFACLinearOperator

    wrapped = _ClassesSecond(model) if loss == "cross_entropy" and y.dim() > 1 else model
    params = list(model.parameters())
    op = KFACLinearOperator(wrapped, nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss(), params,
                            [(x, y)], fisher_type={"type2": "type-2", "empirical": "empirical"}[fisher],
                            kfac_approx=approx, num_per_example_loss_terms=terms, num_data=x.shape[0],
                            separate_weight_and_bias=False, check_deterministic=False)
    dense = op @ torch.eye(sum(p.numel() for p in params))
    return exact.module_blocks(dense, model, linear_names(model))


@pytest.mark.parametrize("name,fisher,approx", NONLINEAR_CASES)
def test_nonlinear_matches_curvlinops(name, fisher, approx):
    pytest.importorskip("curvlinops")
    build, out_shape, loss, terms = NONLINEAR[name]
    model = build()
    x, y = data(out_shape, loss)
    theirs = curvlinops_blocks(model, x, y, loss=loss, fisher=fisher, approx=approx, terms=terms)
    assert_blocks_close(ref.reference_blocks(model, x, y, loss=loss, fisher=fisher, approx=approx), theirs)
    blocks, _ = curvlab_blocks(model, x, y, loss=loss, fisher=fisher, kfac_approx=approx)
    assert_blocks_close(blocks, theirs)


@pytest.mark.parametrize("name,fisher,approx", NONLINEAR_CASES)
def test_nonlinear_matches_reference(name, fisher, approx):
    """The same cases without curvlinops (the reference equals it where it is installed, test above)."""
    build, out_shape, loss, _ = NONLINEAR[name]
    model = build()
    x, y = data(out_shape, loss)
    want = ref.reference_blocks(model, x, y, loss=loss, fisher=fisher, approx=approx)
    blocks, _ = curvlab_blocks(model, x, y, loss=loss, fisher=fisher, kfac_approx=approx)
    assert_blocks_close(blocks, want)


# == (d) loss_terms_per_example given explicitly ============================================================
@pytest.mark.parametrize("name", ["lm-ce", "pooled-ce"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_explicit_loss_terms_equal_to_the_count_change_nothing(name, approx):
    build, out_shape, loss, terms = NONLINEAR[name]
    model = build()
    x, y = data(out_shape, loss)
    want = ref.reference_blocks(model, x, y, loss=loss, approx=approx, loss_terms_per_example=terms)
    assert_blocks_close(want, ref.reference_blocks(model, x, y, loss=loss, approx=approx))
    blocks, _ = curvlab_blocks(model, x, y, loss=loss, kfac_approx=approx, loss_terms_per_example=terms)
    assert_blocks_close(blocks, want)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_one_loss_term_per_sequence(approx, loss):
    """``loss_terms_per_example=1`` on an (N, T, C) output: each example's loss is ONE term (its mean over the T
    rows), factorized exactly (one vector per (row, class), weight 1/T; G normalized by N). The mean loss is the
    same function, so expand on a position-wise model is unchanged (and exact for deep linear MSE); reduce loses
    the cross-position products that merged columns (auto, L = T) bring."""
    model = deep_linear_seq(True) if loss == "mse" else lm_tanh()
    x, y = data((N, T, C), loss)
    want = ref.reference_blocks(model, x, y, loss=loss, approx=approx, loss_terms_per_example=1)
    auto = ref.reference_blocks(model, x, y, loss=loss, approx=approx)
    if approx == "expand":
        assert_blocks_close(want, auto)
        if loss == "mse":
            assert_blocks_close(want, exact_ggn(model, x, y))
    else:
        assert min(rel(want[k], auto[k]) for k in want) > 1e-2
    blocks, _ = curvlab_blocks(model, x, y, loss=loss, kfac_approx=approx, loss_terms_per_example=1)
    assert_blocks_close(blocks, want)


# == a Linear layer used several times in one forward (uses play the role of positions) ======================
def test_weight_sharing_per_example_gradients_exact():
    """Empirical Fisher block of a layer used twice (one mini-block per layer) == torch.func: the per-example
    gradient sums the contributions of both uses before the outer product (ALGORITHMS 11, last paragraph)."""
    model = TwiceApplied()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, D_IN, generator=g), torch.randint(0, C, (N,), generator=g)
    E = exact.exact_blocks("empirical", model, x, y, loss="cross_entropy", modules=["shared", "head"])
    per = ref.per_example_grads(model, x, y, loss="cross_entropy", layer="shared")
    assert_close(per.T @ per / N, E["shared"], what="reference empirical Fisher block")
    blocks, _ = curvlab_blocks(model, x, y, loss="cross_entropy", fisher="empirical", estimator="miniblock",
                               miniblock_size="layer")
    assert_blocks_close(blocks, E)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_weight_sharing_kfac_matches_reference(approx, fisher):
    """``shared`` sees R = 2 rows per example (its two uses), one loss term per example."""
    model = TwiceApplied()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, D_IN, generator=g), torch.randint(0, C, (N,), generator=g)
    want = ref.reference_blocks(model, x, y, loss="cross_entropy", fisher=fisher, approx=approx)
    blocks, _ = curvlab_blocks(model, x, y, loss="cross_entropy", fisher=fisher, kfac_approx=approx)
    assert_blocks_close(blocks, want)


@pytest.mark.parametrize("bias", [True, False])
def test_weight_sharing_expand_exact_with_a_loss_per_use(bias):
    """Both layers are applied to x[:, 0] and x[:, 1] and each use has its own MSE term: the expand setting."""
    model = SharedOnTwoInputs("stack", bias)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(N, 2, D_IN, generator=g), torch.randn(N, 2, C, generator=g)
    ggn = exact_ggn(model, x, y)
    assert_blocks_close(ref.reference_blocks(model, x, y, loss="mse", approx="expand"), ggn)
    blocks, _ = curvlab_blocks(model, x, y, loss="mse", kfac_approx="expand")
    assert_blocks_close(blocks, ggn)


@pytest.mark.parametrize("bias", [True, False])
def test_weight_sharing_reduce_exact_when_uses_are_summed(bias):
    """``head(shared(x_0) + shared(x_1))``: the uses of ``shared`` are aggregated linearly, one loss per example."""
    model = SharedOnTwoInputs("sum", bias)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(N, 2, D_IN, generator=g), torch.randn(N, C, generator=g)
    ggn = exact_ggn(model, x, y)
    assert_blocks_close(ref.reference_blocks(model, x, y, loss="mse", approx="reduce"), ggn)
    blocks, _ = curvlab_blocks(model, x, y, loss="mse", kfac_approx="reduce")
    assert_blocks_close(blocks, ggn)


def test_kfac_approx_values_are_validated():
    model = deep_linear_seq(True)
    for approx in ("expand", "reduce"):
        curvlab.optimizer(model, "kfac", "natural", loss="mse", kfac_approx=approx).capture.remove()
    with pytest.raises((ValueError, TypeError), match="sideways"):
        curvlab.optimizer(model, "kfac", "natural", loss="mse", kfac_approx="sideways")
