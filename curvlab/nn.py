"""``curvlab.nn``: make PyTorch attention preconditionable.

:class:`torch.nn.MultiheadAttention` (Vaswani et al. 2017, "Attention Is All You Need", sec. 3.2.2) keeps the
q/k/v projections in one packed ``in_proj_weight`` and applies them and ``out_proj`` by their weights inside
``F.multi_head_attention_forward``: no projection is ever *called* as a module, so curvlab's forward hooks
(the layer input ``a`` and output gradient ``g`` of K-FAC, Martens & Grosse 2015, sec. 3) never see them.
:class:`LinearMultiheadAttention` computes the same function with four ``nn.Linear`` submodules that ARE
called (the idea of Opacus's ``DPMultiheadAttention``, written anew), and :func:`convert` swaps it in for
every ``nn.MultiheadAttention`` of a model, so ``nn.Transformer`` and friends become preconditionable.

Compatibility with ``nn.MultiheadAttention``: the same ``forward`` (signature, returns, bool/float masks, the
``is_causal`` hint read exactly as torch reads it, ``add_bias_kv``, ``add_zero_attn``, unbatched inputs,
dropout on the attention weights); the same state-dict keys, order and values (``in_proj_weight`` packed, or
``q/k/v_proj_weight`` when kdim/vdim differ) through public state-dict hooks, so checkpoints interchange
(``named_parameters()`` does differ: ``q_proj.weight``, ...). The projections always see batch-first
``(N, L, E)`` inputs, so curvlab counts examples on dim 0. ``nn.TransformerEncoder(Layer)``'s inference fast
path reads ``in_proj_weight``/``in_proj_bias`` (read-only concatenations here) and ``merge_masks`` (torch's):
in eval mode, without gradients and without hooks on the layer, it runs torch's fused kernel on the same
weights, as before conversion, and nested-tensor inputs (the encoder's padded inference path) go to
``torch._native_multi_head_attention`` like the original. Only in those no-gradient inference cases are the
Linear modules bypassed; training and every pass that needs gradients calls them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearMultiheadAttention", "ConversionError", "convert"]

_PROJ = ("q_proj", "k_proj", "v_proj")


class ConversionError(ValueError):
    """A module :func:`convert` cannot replace (the message names its path and the remedy)."""


def _additive(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed to attend) as an additive float mask; float masks are kept as given."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"LinearMultiheadAttention: {name} must be a bool or floating-point tensor, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class LinearMultiheadAttention(nn.Module):
    """Drop-in for :class:`torch.nn.MultiheadAttention` whose projections are called ``nn.Linear`` modules.

    Same constructor and :meth:`forward` as ``nn.MultiheadAttention``; ``q_proj``, ``k_proj``, ``v_proj`` and
    ``out_proj`` are ``nn.Linear`` (``embed_dim x embed_dim``, ``kdim``, ``vdim`` inputs). Attention is
    ``softmax(Q K^T / sqrt(d_head) + mask) V`` per head (explicit when weights are returned, else
    :func:`torch.nn.functional.scaled_dot_product_attention`, as torch does). Build one from an existing
    module with :meth:`from_module`, or a whole model with :func:`convert`.
    """

    merge_masks = nn.MultiheadAttention.merge_masks   # torch's own; read by TransformerEncoderLayer's fast path

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"LinearMultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()
        self.register_state_dict_post_hook(_save_original_layout)
        self.register_load_state_dict_pre_hook(_load_original_layout)

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's init: Xavier-uniform on the packed (3E, E) matrix (or on each separate one),
        zero biases, Xavier-normal ``bias_k``/``bias_v``; ``out_proj.weight`` keeps nn.Linear's init."""
        projs = [getattr(self, p) for p in _PROJ]
        with torch.no_grad():
            if self._qkv_same_embed_dim:
                packed = nn.init.xavier_uniform_(self.q_proj.weight.new_empty(3 * self.embed_dim, self.embed_dim))
                for lin, w in zip(projs, packed.chunk(3)):
                    lin.weight.copy_(w)
            else:
                for lin in projs:
                    nn.init.xavier_uniform_(lin.weight)
            for lin in (*projs, self.out_proj):
                if lin.bias is not None:
                    lin.bias.zero_()
            if self.bias_k is not None:
                nn.init.xavier_normal_(self.bias_k)
                nn.init.xavier_normal_(self.bias_v)

    # -- nn.MultiheadAttention's attribute names (read by nn.Transformer* and by user code) ------------------
    @property
    def in_proj_weight(self) -> Tensor | None:
        """``cat([W_q, W_k, W_v])``, or None when kdim/vdim differ. A new tensor: writing to it changes nothing."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([getattr(self, p).weight for p in _PROJ])

    @property
    def in_proj_bias(self) -> Tensor | None:
        """``cat([b_q, b_k, b_v])``, or None with ``bias=False``. A new tensor: writing to it changes nothing."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([getattr(self, p).bias for p in _PROJ])

    q_proj_weight, k_proj_weight, v_proj_weight = (property(
        lambda self, p=p: None if self._qkv_same_embed_dim else getattr(self, p).weight,
        doc=f"``{p}.weight`` when kdim/vdim differ (as nn.MultiheadAttention's Parameter), else None") for p in _PROJ)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`: ``(attn_output, attn_weights or None)``."""
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, attn_mask, need_weights,
                                        average_attn_weights)
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"LinearMultiheadAttention: query, key and value must all be 3-D (batched) or 2-D "
                             f"(unbatched), got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                need_weights: bool, attn_mask: Tensor | None, average_attn_weights: bool,
                is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """Batch-first ``(N, L, E)`` inputs; the order of operations follows ``F.multi_head_attention_forward``."""
        n, tgt, src, h, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        if query.shape[-1] != self.embed_dim or key.shape[:2] != value.shape[:2] or value.shape[0] != n:
            raise ValueError(f"LinearMultiheadAttention: expected query (N, L, {self.embed_dim}) and key/value with "
                             f"the same batch and length, got {tuple(query.shape)}, {tuple(key.shape)}, "
                             f"{tuple(value.shape)} (batch-first view)")
        kpm = _additive(key_padding_mask, "key_padding_mask", query.dtype)
        if kpm is not None and kpm.shape != (n, src):
            raise ValueError(f"LinearMultiheadAttention: key_padding_mask must have shape ({n}, {src}), "
                             f"got {tuple(kpm.shape)}")
        if is_causal and attn_mask is None:
            raise RuntimeError("LinearMultiheadAttention: is_causal=True needs attn_mask (the hint says attn_mask IS "
                               "causal); build it with nn.Transformer.generate_square_subsequent_mask")
        causal = is_causal and kpm is None and not need_weights   # torch's rule: only then the hint replaces the mask
        mask = None if causal else _additive(attn_mask, "attn_mask", query.dtype)
        if mask is not None:
            if mask.shape == (tgt, src):
                mask = mask.view(1, 1, tgt, src)
            elif mask.shape == (n * h, tgt, src):
                mask = mask.view(n, h, tgt, src)
            else:
                raise RuntimeError(f"LinearMultiheadAttention: attn_mask must have shape ({tgt}, {src}) or "
                                   f"({n * h}, {tgt}, {src}), got {tuple(mask.shape)}")
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)          # (N, H, L, d)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)            # (N, H, S, d)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        extra_kv = [] if self.bias_k is None else [(self.bias_k.view(1, h, 1, d), self.bias_v.view(1, h, 1, d))]
        if self.add_zero_attn:
            extra_kv.append((k.new_zeros(1, h, 1, d), v.new_zeros(1, h, 1, d)))
        for bk, bv in extra_kv:                                           # one more key/value position each
            k, v = torch.cat([k, bk.expand(n, h, 1, d)], dim=2), torch.cat([v, bv.expand(n, h, 1, d)], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        if kpm is not None:
            kpm = kpm.view(n, 1, 1, -1)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / float(d)), k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)       # torch returns the weights after dropout
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim)), weights

    def _nested_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                        attn_mask: Tensor | None, need_weights: bool,
                        average_attn_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Nested tensors (nn.TransformerEncoder's padded inference path): torch's fused kernel, as the original."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        why = [reason for bad, reason in (
            (not (query is key and key is value), "query, key and value are not the same tensor"),
            (self.training, "the module is in training mode"), (grad, "gradients are required"),
            (not self.batch_first, "batch_first is False"), (not self._qkv_same_embed_dim, "kdim/vdim differ"),
            (self.q_proj.bias is None, "bias=False"), (self.num_heads % 2 == 1, "num_heads is odd"),
            (self.bias_k is not None or self.add_zero_attn, "add_bias_kv or add_zero_attn is set"),
            (key_padding_mask is not None or attn_mask is not None, "a mask was given")) if bad]
        if why:
            raise ValueError("LinearMultiheadAttention: nested-tensor inputs are supported only where "
                             f"nn.MultiheadAttention's fused path applies; here {', '.join(why)}. Pass a padded "
                             "tensor and key_padding_mask instead")
        return torch._native_multi_head_attention(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, None, need_weights, average_attn_weights, None)

    # -- construction from nn.MultiheadAttention -----------------------------------------------------------
    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, name: str = "<module>") -> LinearMultiheadAttention:
        """A new module computing the same function with copies of ``mha``'s parameters (values,
        ``requires_grad``, device, dtype) and its train/eval mode. ``name`` is used in error messages."""
        if type(mha) is not nn.MultiheadAttention:
            raise ConversionError(
                f"{name}: {type(mha).__qualname__} is a subclass of nn.MultiheadAttention and may compute something "
                "else; convert handles nn.MultiheadAttention itself only. Build its replacement with "
                "LinearMultiheadAttention.from_module on a plain nn.MultiheadAttention, or keep it unconverted")
        hooked = [f"{where}{attr}" for where, m in (("", mha), ("out_proj.", mha.out_proj))
                  for attr, value in vars(m).items() if attr.endswith("hooks") and value]   # _forward_hooks, ...
        if hooked:
            raise ConversionError(
                f"{name}: hooks are registered on the module ({', '.join(hooked)}); they "
                "would be lost by the conversion. Convert the model first, then register hooks (and build any "
                "curvlab optimizer) on the converted model")
        bias = mha.in_proj_bias is not None
        if (mha.out_proj.bias is not None) != bias or (mha.bias_k is None) != (mha.bias_v is None):
            raise ConversionError(f"{name}: only one of in_proj_bias/out_proj.bias (or of bias_k/bias_v) is set, which "
                                  "nn.MultiheadAttention's constructor never does; set both or neither")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias, mha.bias_k is not None, mha.add_zero_attn,
                  mha.kdim, mha.vdim, mha.batch_first, device=ref.device, dtype=ref.dtype)
        if mha._qkv_same_embed_dim:       # {new parameter: (value, original parameter)}
            sources = {f"{p}.weight": (w, mha.in_proj_weight) for p, w in zip(_PROJ, mha.in_proj_weight.chunk(3))}
        else:
            sources = {f"{p}.weight": (getattr(mha, f"{p}_weight"),) * 2 for p in _PROJ}
        if bias:
            sources.update({f"{p}.bias": (b, mha.in_proj_bias) for p, b in zip(_PROJ, mha.in_proj_bias.chunk(3))})
        sources.update({n: (t, t) for n, t in mha.named_parameters() if n.startswith(("out_proj.", "bias_"))})
        params = dict(new.named_parameters())
        with torch.no_grad():
            for pname, (value, owner) in sources.items():
                params[pname].copy_(value)
                params[pname].requires_grad_(owner.requires_grad)
        return new.train(mha.training)


# -- state-dict hooks: present nn.MultiheadAttention's keys ----------------------------------------------------
def _original_keys(module: LinearMultiheadAttention) -> list[tuple[str, list[str]]]:
    """``(original key, [own keys])`` for the in-projection, in nn.MultiheadAttention's order."""
    if module._qkv_same_embed_dim:
        keys = [("in_proj_weight", [f"{p}.weight" for p in _PROJ])]
    else:
        keys = [(f"{p}_weight", [f"{p}.weight"]) for p in _PROJ]
    if module.q_proj.bias is not None:
        keys.append(("in_proj_bias", [f"{p}.bias" for p in _PROJ]))
    return keys


def _save_original_layout(module, state, prefix, local_metadata) -> None:
    """State-dict post-hook: pack ``q_proj.weight, ...`` into ``in_proj_weight, ...`` (in place, same order)."""
    moved = {}
    for key, parts in _original_keys(module):
        tensors = [state.pop(prefix + part) for part in parts]
        moved[key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    for key in ("bias_k", "bias_v", "out_proj.weight", "out_proj.bias"):
        if prefix + key in state:
            moved[key] = state.pop(prefix + key)
    for key, tensor in moved.items():
        state[prefix + key] = tensor
    metadata = getattr(state, "_metadata", None)
    for p in _PROJ if metadata is not None else ():
        metadata.pop(prefix + p, None)


def _load_original_layout(module, state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Load-state-dict pre-hook: split nn.MultiheadAttention's keys into the Linear modules' keys.
    A checkpoint of this module's own ``named_parameters`` layout (``q_proj.weight``...) loads as well."""
    for key, parts in _original_keys(module):
        if prefix + key not in state:
            continue
        tensor = state.pop(prefix + key)
        if len(parts) > 1 and tensor.shape[:1] != (3 * module.embed_dim,):
            errors.append(f"size mismatch for {prefix}{key}: copying a param with shape {tuple(tensor.shape)} "
                          f"from checkpoint, the shape in current model starts with {3 * module.embed_dim}")
            continue
        for part, piece in zip(parts, tensor.chunk(len(parts))):
            state[prefix + part] = piece


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by an equivalent :class:`LinearMultiheadAttention`.

    IN PLACE, like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the submodules of ``model`` are
    swapped and ``model`` is returned (a new module if ``model`` itself is an ``nn.MultiheadAttention``); use
    ``convert(copy.deepcopy(model))`` to keep the original. The new modules own new parameters holding copies
    of the old values, so build optimizers (``curvlab.optimizer``) and register hooks AFTER converting. A module
    shared at several places stays shared. Works for ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and
    ``nn.Transformer`` (their fast paths see the same attributes, see the module docstring).
    Raises :class:`ConversionError` naming the module path for subclasses of ``nn.MultiheadAttention``,
    modules with hooks, or inconsistent biases.
    """
    done: dict[int, nn.Module] = {}

    def swap(module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, nn.MultiheadAttention):
            if id(module) not in done:
                done[id(module)] = LinearMultiheadAttention.from_module(module, name=path or type(module).__name__)
            return done[id(module)]
        for child_name, child in list(module.named_children()):
            new = swap(child, f"{path}.{child_name}" if path else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return swap(model, "")
