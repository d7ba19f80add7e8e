"""Layer adapters: how a module's parameters are seen as one matrix, and how its inputs and output
gradients become the rows that curvature statistics are built from.

Matrix view (ALGORITHMS.md section 0): a layer computes ``s = W a + b``; its parameters are viewed as
``Wbar = [W | b]`` of shape ``(d_out, d_in + 1)`` (bias in the LAST column, the homogeneous coordinate of
``abar = [a; 1]``); without bias ``Wbar = W``. Conv2d (KFC, Grosse & Martens 2016, eq. C.1) uses the same
view with ``W`` reshaped to ``(c_out, c_in * k_h * k_w)`` and ``a`` the im2col patches of every output
location, so a conv layer contributes ``T = H_out * W_out`` rows per example.

Row layout returned to estimators:

* ``input_rows(module, x)``  -> ``(N, T, d_in [+1])``  homogeneous inputs (patches) per example and location
* ``output_rows(module, g)`` -> ``(N, T, d_out)``      output gradients per example and location

Parameter order: ``Wbar`` is flattened row-major; :meth:`LayerAdapter.param_order` gives the permutation
from that order to ``torch.cat([p.reshape(-1) for p in module.parameters(recurse=False)])`` (weight first,
then bias), the order of :meth:`curvlab.CurvlabOptimizer.blocks`.

Partly frozen layers (:meth:`LayerAdapter.select`, called by the optimizer with the trainable parameters): the
view holds only what trains. A frozen bias drops the homogeneous column (``Wbar = W``, ``abar = a``); a frozen
weight leaves the bias as a weight on a constant input 1 (``Wbar = b`` of shape ``(d_out, 1)``, one input
column of ones), so every estimator handles it as a one-column layer. Either way the curvature block is the
sub-block of the full layer's for the trainable parameters (for K-FAC: the rows and columns of ``A`` kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ADAPTERS, register_adapter


class UnsupportedLayer(ValueError):
    """A module a layer adapter cannot handle (the message names the layer and the remedy)."""


class LayerAdapter:
    """Base class. Subclasses set ``module_types`` and implement the row and matrix conversions."""

    module_types: tuple[type[nn.Module], ...] = ()

    def __init__(self) -> None:
        #: which of the module's parameters the view holds (:meth:`select`); both by default
        self.weight_trained = True
        self.bias_trained = True

    # -- claiming --------------------------------------------------------------------------------------
    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` if this adapter can precondition ``module``, otherwise why not."""
        return None

    def select(self, module: nn.Module, params: list[nn.Parameter]) -> str:
        """Restrict the view to ``params`` (the trainable ones); returns a note for ``coverage()`` ("" if all)."""
        ids = {id(p) for p in params}
        bias = getattr(module, "bias", None)
        self.weight_trained = id(module.weight) in ids
        self.bias_trained = bias is not None and id(bias) in ids
        if not self.weight_trained:
            return "weight frozen: the bias as a one-column layer"
        return "bias frozen" if bias is not None and not self.bias_trained else ""

    def has_bias(self, module: nn.Module) -> bool:
        """Does the view carry a homogeneous bias column? (Not when the bias or the weight is frozen.)"""
        return self.weight_trained and self.bias_trained and getattr(module, "bias", None) is not None

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        return list(module.parameters(recurse=False))

    # -- matrix view -----------------------------------------------------------------------------------
    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in + has_bias)`` of the matrix view (``(d_out, 1)`` when only the bias trains)."""
        w = module.weight
        if not self.weight_trained:
            return w.shape[0], 1
        return w.shape[0], w[0].numel() + int(self.has_bias(module))

    def to_matrix(self, module: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Stack the trainable parameters' tensors (weight-shaped, bias-shaped) into the ``(d_out, cols)`` view."""
        w = tensors[0].reshape(tensors[0].shape[0], -1)
        if self.has_bias(module):
            return torch.cat([w, tensors[1].reshape(-1, 1)], dim=1)
        return w

    def from_matrix(self, module: nn.Module, mat: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`to_matrix`: tensors shaped like the trainable ``module.parameters(recurse=False)``."""
        if not self.weight_trained:
            return [mat.reshape(module.bias.shape)]
        w = module.weight
        if self.has_bias(module):
            return [mat[:, :-1].reshape(w.shape), mat[:, -1].reshape(module.bias.shape)]
        return [mat.reshape(w.shape)]

    def param_order(self, module: nn.Module) -> torch.Tensor:
        """Index ``idx`` with ``param_vector = wbar.reshape(-1)[idx]`` (weight entries, then bias)."""
        d_out, cols = self.shape(module)
        grid = torch.arange(d_out * cols).reshape(d_out, cols)
        if self.has_bias(module):
            return torch.cat([grid[:, :-1].reshape(-1), grid[:, -1]])
        return grid.reshape(-1)

    # -- statistics rows -------------------------------------------------------------------------------
    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def raw_input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``input_rows`` before the homogeneous column is appended, for adapters whose ``input_rows`` is
        ``_homogeneous(raw rows)`` (Linear, Conv2d); ``None`` otherwise. K-FAC forms ``A`` from these blockwise
        (:func:`curvlab.kernels.homogeneous_gram`) instead of copying the rows into ``[x 1]``."""
        return None

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _homogeneous(self, module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        if not self.weight_trained:                               # only the bias trains: its input is 1
            return rows.new_ones(rows.shape[:-1] + (1,))
        if not self.has_bias(module):
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)


@register_adapter("linear")
class LinearAdapter(LayerAdapter):
    """nn.Linear: ``Wbar = [W | b]``; inputs of shape (N, ..., d_in) give one row per leading index."""

    module_types = (nn.Linear,)

    def raw_input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._homogeneous(module, self.raw_input_rows(module, x))

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


@register_adapter("conv2d")
class Conv2dAdapter(LayerAdapter):
    """nn.Conv2d (KFC): im2col patches (zero padding included) as inputs, one row per output location."""

    module_types = (nn.Conv2d,)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported by the Conv2d adapter"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} given as a string is not supported; give it as integers"
        return None

    def raw_input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)                      # (N, c_in k_h k_w, T)
        return patches.transpose(1, 2)

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._homogeneous(module, self.raw_input_rows(module, x))

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g.flatten(2).transpose(1, 2)                           # (N, T, c_out)


@register_adapter("embedding")
class EmbeddingAdapter(LayerAdapter):
    """nn.Embedding as a Linear layer on one-hot inputs: ``out = W^T onehot(i)``, so the matrix view is
    ``Wbar = W^T`` of shape ``(embedding_dim, num_embeddings)`` and the input rows are the one-hot tokens.

    K-FAC's input factor is then diagonal, the token frequencies (``A = diag(counts) / N_terms``), and the
    output factor the usual ``G``; every estimator sees an ordinary (one-hot) Linear layer. Rows of
    ``padding_idx`` get no gradient from PyTorch and stay zero under any of the estimators' solves with a diagonal
    input side. The one-hot rows and ``A`` are dense: vocabularies above :attr:`max_vocab` get the first-order
    fallback (register a sparse adapter for large vocabularies); ``max_norm`` (weights renormalized in place
    during forward) and ``sparse=True`` gradients are refused."""

    module_types = (nn.Embedding,)
    max_vocab = 8192

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes the embedding in place during forward; not supported by the Embedding adapter"
        if module.sparse:
            return "sparse=True gives sparse gradients; the Embedding adapter needs dense ones"
        if module.num_embeddings > self.max_vocab:
            return (f"num_embeddings={module.num_embeddings} > {self.max_vocab}: the one-hot input factor would be "
                    "dense and too large (EmbeddingAdapter.max_vocab)")
        return None

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def to_matrix(self, module: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0].T

    def from_matrix(self, module: nn.Module, mat: torch.Tensor) -> list[torch.Tensor]:
        return [mat.T]

    def param_order(self, module: nn.Module) -> torch.Tensor:
        d_out, cols = self.shape(module)
        return torch.arange(d_out * cols).reshape(d_out, cols).T.reshape(-1)

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        idx = x.reshape(x.shape[0], -1).long()
        return F.one_hot(idx, module.num_embeddings)

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@register_adapter("scale_shift")
class ScaleShiftAdapter(LayerAdapter):
    """nn.LayerNorm / nn.RMSNorm with affine parameters: ``s = gamma * xhat + beta`` elementwise.

    Matrix view ``(d, k)``: one row per normalized feature (``d = prod(normalized_shape)``), columns the
    trainable ones of ``[gamma | beta]``. ``input_rows`` gives ``xhat`` (recomputed from the input with the
    layer's ``eps``), ``output_rows`` the output gradients, both ``(N, T, d)``; ``elementwise = True`` tells
    estimators that the rows are NOT a Kronecker input side (:mod:`curvlab.estimators.scale_shift`)."""

    module_types = _NORMS
    elementwise = True

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if getattr(module, "weight", None) is None and getattr(module, "bias", None) is None:
            return "no affine parameters (elementwise_affine=False)"
        return None

    def select(self, module: nn.Module, params: list[nn.Parameter]) -> str:
        ids = {id(p) for p in params}
        self.weight_trained = getattr(module, "weight", None) is not None and id(module.weight) in ids
        self.bias_trained = getattr(module, "bias", None) is not None and id(module.bias) in ids
        frozen = [n for n, t in (("scale", self.weight_trained), ("shift", self.bias_trained))
                  if not t and getattr(module, "weight" if n == "scale" else "bias", None) is not None]
        return f"{' and '.join(frozen)} frozen" if frozen else ""

    def has_bias(self, module: nn.Module) -> bool:
        return False                                  # no homogeneous column: the shift is a column of its own

    def _features(self, module: nn.Module) -> int:
        return int(torch.Size(module.normalized_shape).numel())

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return self._features(module), int(self.weight_trained) + int(self.bias_trained)

    def to_matrix(self, module: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([t.reshape(-1) for t in tensors], dim=1)

    def from_matrix(self, module: nn.Module, mat: torch.Tensor) -> list[torch.Tensor]:
        return [mat[:, c].reshape(module.normalized_shape) for c in range(mat.shape[1])]

    def param_order(self, module: nn.Module) -> torch.Tensor:
        d, k = self.shape(module)
        return torch.arange(d * k).reshape(d, k).T.reshape(-1)

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if isinstance(module, nn.LayerNorm):
            xhat = (x - x.mean(dim=dims, keepdim=True)) * torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True)
                                                                       + eps)
        else:
            xhat = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)
        return xhat.reshape(x.shape[0], -1, self._features(module))

    def output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, self._features(module))

    def elementwise_grads(self, g: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """``(N, d, k)`` per-example gradients of ``[gamma | beta]`` (trainable columns) from ``(N, T, d)`` rows."""
        cols = ([(g * xhat).sum(dim=1)] if self.weight_trained else []) + ([g.sum(dim=1)] if self.bias_trained else [])
        return torch.stack(cols, dim=2)


def find_adapter(module: nn.Module) -> tuple[LayerAdapter | None, str | None]:
    """The adapter claiming ``module`` (most specific registered type wins), or ``(None, reason)``."""
    best: tuple[int, type] | None = None
    for _, cls in ADAPTERS.items():
        for mtype in cls.module_types:
            if isinstance(module, mtype):
                depth = type(module).__mro__.index(mtype)
                if best is None or depth < best[0]:
                    best = (depth, cls)
    if best is None:
        return None, f"no layer adapter is registered for {type(module).__name__}"
    adapter = best[1]()
    reason = adapter.unsupported_reason(module)
    return (None, reason) if reason else (adapter, None)
