"""Hand-made K-FAC-expand / K-FAC-reduce blocks (ALGORITHMS.md section 11; Eschenhagen et al., NeurIPS 2023).

Independent of curvlab on purpose (plain forward hooks and ``torch.autograd.grad``), so that tests can use it as
the reference for the sequence / weight-sharing statistics. Verified in ``tests/test_kfac_sequence.py``
(``test_reference_*``) against the exact GGN where the paper says K-FAC is exact, against torch.func
per-example gradients, against the exact output Hessian, and against curvlinops where it is installed.

Setting. A Linear layer ``s = W a + b`` sees, for example ``n``, inputs ``a_{n,r}`` at ``R`` positions ``r``
(the middle dimensions of its input, concatenated over all its uses in one forward: a layer called twice on
``(N, d)`` inputs has ``R = 2``). The model output ``f`` has shape ``(N, *rows, C)``: every row (the middle
dimensions, ``R_out = prod(f.shape[1:-1])`` of them, 1 for ``(N, C)``) carries one loss term of the user's mean
loss, ``F.cross_entropy(f.reshape(-1, C), y.reshape(-1))`` or ``F.mse_loss(f, y)``::

    L = 1/(N R_out) sum_{n, rows} l_row,   CE: l_row = -log softmax(f_row)[y_row],   MSE: l_row = (1/C)||f_row - y_row||^2

Loss terms. ``L`` (``loss_terms_per_example``, default ``R_out``) splits each example's rows into ``L`` terms of
``m = R_out / L`` consecutive rows; term ``k`` has ``l_term = (1/m) sum_{rows of k} l_row``, so that
``L = 1/(N L) sum_terms l_term`` is the same function for every admissible ``L``.

Back-propagated vectors ``v`` (shaped like ``f``; each one back-propagated to every use of the layer by ONE
``autograd.grad`` call, giving ``g_{v,n,r} = d <f, v> / d s_{n,r}``, per-loss-term scale, no 1/N):

* ``fisher="type2"``: a square root of each term's Hessian, columns merged across the terms of all examples
  (as curvlinops does: one backward per column). For row ``j`` of a term (``j = row mod m``) and class ``c``::

      v_{(j,c)}[n, row] = sqrt(1/m) S_row[:, c]  if row mod m == j else 0,
      S_row S_row^T = d^2 l_row / d f_row^2:   CE  S[:, c] = sqrt(p_c)(e_c - p);   MSE  S = sqrt(2/C) I

  (``m C`` vectors; ``L = R_out`` gives the ``C`` merged columns of curvlinops, ``L = 1`` the exact
  factorization of the whole example's Hessian, one vector per (row, class)).
* ``fisher="empirical"``: one vector, the per-term-scale gradient of the real loss ``v = N L dL/df``.

Factors (bias folded in: ``abar = [a; 1]``; ``N_terms = N L`` with ``N = f.shape[0]``)::

    expand:  A = 1/(N_a R) sum_{n,r} abar_{n,r} abar_{n,r}^T          G = 1/N_terms sum_v sum_{n,r} g_{v,n,r} g_{v,n,r}^T
    reduce:  abar_n = (1/R) sum_r abar_{n,r},   gbar_{v,n} = sum_r g_{v,n,r}
             A = 1/N_a sum_n abar_n abar_n^T                          G = 1/N_terms sum_v sum_n gbar_{v,n} gbar_{v,n}^T

``N_a`` is the leading dimension of the layer's input (``N`` unless the model folds positions into the batch).
With ``L = R = R_out`` (a loss term per position) expand is the brief's "A = mean over (n, r) of a a^T, G = mean
over (n, r) of g g^T"; with one loss per example (``L = 1``) G sums over the positions (KFC's split up to the
scalar moved between A and G). The dense block is ``G (x) A`` on the row-major ``Wbar = [W | b]``, returned in
the order of ``torch.cat([W.reshape(-1), b])`` (curvlab's ``blocks()`` order).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["user_loss", "record_uses", "output_vectors", "backprop", "kfac_factors", "kron_block",
           "reference_blocks", "per_example_grads"]


def user_loss(loss: str, out: Tensor, y: Tensor) -> Tensor:
    """The user's mean loss: CE with classes in the last dimension, MSE averaged over every entry."""
    if loss == "cross_entropy":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if loss == "mse":
        return F.mse_loss(out, y)
    raise ValueError(f"unknown loss {loss!r}")


def record_uses(model: nn.Module, x: Tensor, names: list[str]) -> tuple[Tensor, dict[str, list[tuple[Tensor, Tensor]]]]:
    """Forward ``x``; for every module in ``names`` the list of its uses ``(input (detached), output)``.

    Outputs stay in the graph so vectors can be back-propagated to them. Hooks are removed afterwards.
    """
    mods = dict(model.named_modules())
    uses: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
            uses[name].append((inputs[0].detach(), output))
        handles.append(mods[name].register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, uses


def _rows(t: Tensor) -> Tensor:
    """``(N, *mid, k)`` -> ``(N, prod(mid), k)`` (a 2-D tensor gets one row per example)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def output_vectors(loss: str, fisher: str, out: Tensor, y: Tensor | None,
                   loss_terms_per_example: int | None = None) -> tuple[list[Tensor], int]:
    """The vectors ``v`` of the module docstring (shaped like ``out``) and ``N_terms = N L``."""
    f = _rows(out.detach())                                        # (N, R_out, C)
    n, r_out, c = f.shape
    terms = r_out if loss_terms_per_example is None else int(loss_terms_per_example)
    if terms < 1 or r_out % terms:
        raise ValueError(f"loss_terms_per_example={terms} must divide the {r_out} rows per example")
    m = r_out // terms
    if fisher == "type2":
        if loss == "cross_entropy":
            p = torch.softmax(f, dim=-1)
            eye = torch.eye(c, dtype=f.dtype)
            cols = [p[..., k:k + 1].sqrt() * (eye[k] - p) for k in range(c)]   # S_row[:, k], (N, R_out, C)
        elif loss == "mse":
            cols = [math.sqrt(2.0 / c) * torch.eye(c, dtype=f.dtype)[k].expand_as(f) for k in range(c)]
        else:
            raise ValueError(f"unknown loss {loss!r}")
        row_in_term = torch.arange(r_out) % m
        vecs = []
        for j in range(m):
            mask = (row_in_term == j).to(f.dtype).reshape(1, r_out, 1)
            vecs += [(col * mask / math.sqrt(m)).reshape(out.shape) for col in cols]
        return vecs, n * terms
    if fisher == "empirical":
        if y is None:
            raise ValueError("fisher='empirical' needs the targets")
        leaf = out.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(user_loss(loss, leaf, y), leaf)
        return [grad * (n * terms)], n * terms
    raise ValueError(f"unknown fisher {fisher!r}")


def backprop(out: Tensor, uses: list[tuple[Tensor, Tensor]], vecs: list[Tensor]) -> list[Tensor]:
    """``g_v`` of shape ``(N, R, d_out)`` for every vector: ``d <out, v> / d s`` at every use, uses concatenated
    along the shared dimension (same order as :func:`_inputs`)."""
    outputs = [s for _, s in uses]
    gs = []
    for v in vecs:
        grads = torch.autograd.grad(out, outputs, grad_outputs=v, retain_graph=True, allow_unused=True)
        gs.append(torch.cat([_rows(torch.zeros_like(s) if g is None else g) for s, g in zip(outputs, grads)], 1))
    return gs


def _inputs(uses: list[tuple[Tensor, Tensor]], bias: bool) -> Tensor:
    a = torch.cat([_rows(x) for x, _ in uses], dim=1)             # (N_a, R, d_in)
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def kfac_factors(a: Tensor, gs: list[Tensor], approx: str, num_terms: int) -> tuple[Tensor, Tensor]:
    """``(A, G)`` from homogeneous inputs ``a`` ``(N_a, R, d_in[+1])`` and vectors ``gs`` ``[(N_a, R, d_out)]``."""
    n_a, r, _ = a.shape
    if approx == "expand":
        rows = a.reshape(n_a * r, -1)
        A = rows.T @ rows / (n_a * r)
        G = sum(g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) for g in gs) / num_terms
    elif approx == "reduce":
        abar = a.mean(dim=1)
        A = abar.T @ abar / n_a
        G = sum(g.sum(dim=1).T @ g.sum(dim=1) for g in gs) / num_terms
    else:
        raise ValueError(f"unknown approximation {approx!r}")
    return A, G


def kron_block(A: Tensor, G: Tensor, bias: bool) -> Tensor:
    """``G (x) A`` (row-major ``Wbar``) re-indexed to ``cat([W.reshape(-1), b])``."""
    d_out, cols = G.shape[0], A.shape[0]
    grid = torch.arange(d_out * cols).reshape(d_out, cols)
    idx = torch.cat([grid[:, :-1].reshape(-1), grid[:, -1]]) if bias else grid.reshape(-1)
    K = torch.kron(G, A)
    return K[idx[:, None], idx]


def reference_blocks(model: nn.Module, x: Tensor, y: Tensor | None, *, loss: str, fisher: str = "type2",
                     approx: str = "expand", loss_terms_per_example: int | None = None,
                     layers: list[str] | None = None, factors: bool = False):
    """``{name: dense K-FAC block}`` for the Linear layers ``layers`` (default: all) of ``model`` on ``(x, y)``.

    With ``factors=True`` returns ``{name: (A, G)}`` instead.
    """
    if layers is None:
        layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    out, uses = record_uses(model, x, layers)
    vecs, num_terms = output_vectors(loss, fisher, out, y, loss_terms_per_example)
    mods = dict(model.named_modules())
    result = {}
    for name in layers:
        if not uses[name]:
            raise ValueError(f"layer {name!r} was not used in the forward")
        bias = mods[name].bias is not None
        A, G = kfac_factors(_inputs(uses[name], bias), backprop(out, uses[name], vecs), approx, num_terms)
        result[name] = (A, G) if factors else kron_block(A, G, bias)
    return result


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor, *, loss: str, layer: str) -> Tensor:
    """``(N, P_layer)`` gradients of each example's loss ``l_n`` w.r.t. ``layer``'s parameters, summed over its
    uses and positions: ``sum_r g_{n,r} abar_{n,r}^T`` (row-major ``Wbar``), re-indexed to ``cat([W, b])``.
    ``l_n`` is the example's share of the user's loss times ``N`` (``fisher="empirical"`` with ``L = 1``)."""
    out, uses = record_uses(model, x, [layer])
    vecs, _ = output_vectors(loss, "empirical", out, y, loss_terms_per_example=1)
    (g,) = backprop(out, uses[layer], vecs)
    bias = dict(model.named_modules())[layer].bias is not None
    a = _inputs(uses[layer], bias)
    per = torch.einsum("nro,nri->noi", g, a)                       # (N, d_out, d_in[+1])
    if not bias:
        return per.reshape(per.shape[0], -1)
    return torch.cat([per[:, :, :-1].reshape(per.shape[0], -1), per[:, :, -1]], dim=1)
