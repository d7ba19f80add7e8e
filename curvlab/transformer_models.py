"""Small transformers built on ``torch.nn.TransformerEncoder``, registered as ``transformer_lm`` and ``vit``.

=================== ===================================================================================
``transformer_lm``  :class:`TransformerLM`: token + learned positional embeddings, a causal
                    ``nn.TransformerEncoder`` (Vaswani et al. 2017; decoder-only use as in GPT), a linear
                    head; logits ``(N, T, V)`` per position (``pool="none"``) or ``(N, V)`` from the last
                    position (``pool="last"``, one label per sequence: the ``modular`` data set)
``vit``             :class:`VisionTransformer` (Dosovitskiy et al. 2021): non-overlapping patches
                    embedded by a ``Linear`` on the flattened patch (or an equivalent strided ``Conv2d``),
                    learned positions, a class token or mean pooling, a linear head
=================== ===================================================================================

Attention is ``nn.MultiheadAttention`` inside ``nn.TransformerEncoderLayer``, converted by
:func:`curvlab.nn.convert` (same function, same state-dict keys) so that its q/k/v/out projections are called
``nn.Linear`` layers every estimator preconditions; embeddings and LayerNorms have adapters of their own. Only
the ViT's class token and position table (bare parameters) get the first-order fallback
(``opt.coverage_report()``).

``d_model`` is the width; ``dim_feedforward`` defaults to ``2 * d_model`` so that one option scales
the whole network.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import convert
from .registry import register_model

__all__ = ["TransformerLM", "VisionTransformer", "build_transformer_lm", "build_vit", "POOLS"]

#: ``pool`` values: per-position outputs, the last position, the mean over positions, the class token.
POOLS = {"lm": ("none", "last", "mean"), "vit": ("cls", "mean")}


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _encoder(d_model: int, nhead: int, num_layers: int, dim_feedforward: int | None, dropout: float,
             norm_first: bool, activation: str) -> tuple[nn.TransformerEncoder, int]:
    """A batch-first ``nn.TransformerEncoder`` (with a final LayerNorm when pre-norm) and its FF width."""
    ff = 2 * d_model if dim_feedforward is None else dim_feedforward
    _check_positive(d_model=d_model, nhead=nhead, num_layers=num_layers, dim_feedforward=ff)
    if d_model % nhead:
        raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
    if not isinstance(norm_first, bool):
        raise ValueError(f"norm_first must be true or false, got {norm_first!r}")
    layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    # Pre-norm (norm_first) stacks need a LayerNorm on the output (GPT-2, ViT); post-norm ones end normalized.
    final = nn.LayerNorm(d_model) if norm_first else None
    return nn.TransformerEncoder(layer, num_layers, norm=final, enable_nested_tensor=False), ff


class TransformerLM(nn.Module):
    """A decoder-only (causal) transformer over token ids ``(N, T)``, ``T <= context``.

    ``h = embed(tokens) + pos(0..T-1)``, then ``num_layers`` ``nn.TransformerEncoderLayer`` with a causal
    mask (position ``t`` attends to ``<= t``; ``causal=False`` for bidirectional attention), then
    ``head``: logits ``(N, T, num_outputs)`` (``pool="none"``), or ``(N, num_outputs)`` from the last
    position (``"last"``) or the mean over positions (``"mean"``).
    """

    def __init__(self, vocab_size: int, num_outputs: int, context: int, d_model: int = 64, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int | None = None, dropout: float = 0.0,
                 norm_first: bool = True, activation: str = "relu", pool: str = "none", causal: bool = True
                 ) -> None:
        super().__init__()
        _check_positive(vocab_size=vocab_size, num_outputs=num_outputs, context=context)
        if pool not in POOLS["lm"]:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS['lm']))}, got {pool!r}")
        self.context, self.pool, self.causal = context, pool, bool(causal)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.encoder, _ = _encoder(d_model, nhead, num_layers, dim_feedforward, dropout, norm_first, activation)
        self.head = nn.Linear(d_model, num_outputs)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's embedding init
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TransformerLM expects integer token ids of shape (N, T), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}; use a token data set (modular, chars) or a feature model")
        t = tokens.shape[1]
        if not 1 <= t <= self.context:
            raise ValueError(f"sequence length {t} is outside [1, context={self.context}]")
        h = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=h.device, dtype=h.dtype) \
            if self.causal else None
        h = self.encoder(h, mask=mask, is_causal=self.causal)
        if self.pool == "last":
            h = h[:, -1]
        elif self.pool == "mean":
            h = h.mean(dim=1)
        return self.head(h)


class VisionTransformer(nn.Module):
    """A small ViT on ``(C, H, W)`` images, given flat ``(N, C*H*W)`` or ``(N, C, H, W)``.

    Patches of ``patch_size`` (an int or ``(ph, pw)``, dividing ``H`` and ``W``) are flattened in
    ``(C, ph, pw)`` order and embedded by ``nn.Linear(C*ph*pw, d_model)`` (``patch_embed="linear"``) or by
    ``nn.Conv2d(C, d_model, patch, stride=patch)`` (``"conv"``, the same map with the weight viewed as
    ``(d_model, C, ph, pw)``); learned positions; a class token read by the head (``pool="cls"``) or the
    mean over patches (``"mean"``); a bidirectional ``nn.TransformerEncoder``; ``head`` a Linear.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_outputs: int, patch_size: int | tuple[int, int] = 4,
                 d_model: int = 64, nhead: int = 4, num_layers: int = 2, dim_feedforward: int | None = None,
                 dropout: float = 0.0, norm_first: bool = True, activation: str = "gelu", pool: str = "cls",
                 patch_embed: str = "linear") -> None:
        super().__init__()
        c, h, w = (int(s) for s in image_shape)
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(s) for s in patch_size)
        _check_positive(num_outputs=num_outputs, patch_height=ph, patch_width=pw)
        if h % ph or w % pw:
            raise ValueError(f"patch_size {(ph, pw)} must divide the image size {(h, w)}")
        if pool not in POOLS["vit"]:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS['vit']))}, got {pool!r}")
        if patch_embed not in ("linear", "conv"):
            raise ValueError(f"patch_embed must be 'linear' or 'conv', got {patch_embed!r}")
        self.image_shape, self.patch, self.pool = (c, h, w), (ph, pw), pool
        self.num_patches = (h // ph) * (w // pw)
        self.patch_embed = nn.Linear(c * ph * pw, d_model) if patch_embed == "linear" else \
            nn.Conv2d(c, d_model, (ph, pw), stride=(ph, pw))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, self.num_patches + (pool == "cls"), d_model))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.encoder, _ = _encoder(d_model, nhead, num_layers, dim_feedforward, dropout, norm_first, activation)
        self.head = nn.Linear(d_model, num_outputs)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, num_patches, C*ph*pw)``, patches in row-major grid order."""
        n, (c, h, w), (ph, pw) = images.shape[0], self.image_shape, self.patch
        x = images.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, self.num_patches, c * ph * pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(x.shape[0], *self.image_shape)
        if isinstance(self.patch_embed, nn.Linear):
            tokens = self.patch_embed(self.patches(images))
        else:
            tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        h = self.encoder(tokens + self.pos)
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))


@register_model("transformer_lm")
def build_transformer_lm(input_shape: tuple[int, ...], num_outputs: int, vocab_size: int | None = None,
                         d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                         dim_feedforward: int | None = None, dropout: float = 0.0, norm_first: bool = True,
                         activation: str = "relu", pool: str = "none", causal: bool = True) -> nn.Module:
    """Causal transformer over token ids (:class:`TransformerLM`); ``context`` = the data's sequence length.

    ``vocab_size=None`` takes the data set's (the runner fills it from ``Split.vocab_size``). ``pool``:
    ``"none"`` for a label per position (``chars``), ``"last"`` for one label per sequence (``modular``).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 1:
        raise ValueError(f"model 'transformer_lm' reads token sequences (T,), but the data set gives examples of "
                         f"shape {shape}; use a token data set such as 'modular' or 'chars'")
    if vocab_size is None:
        raise ValueError("model 'transformer_lm' needs vocab_size: use a token data set ('modular', 'chars'), "
                         "whose vocabulary the runner passes, or set model.vocab_size")
    return convert(TransformerLM(vocab_size, num_outputs, shape[0], d_model, nhead, num_layers, dim_feedforward,
                                 dropout, norm_first, activation, pool, causal))


@register_model("vit")
def build_vit(input_shape: tuple[int, ...], num_outputs: int, patch_size: int = 4, d_model: int = 64,
              nhead: int = 4, num_layers: int = 2, dim_feedforward: int | None = None, dropout: float = 0.0,
              norm_first: bool = True, activation: str = "gelu", pool: str = "cls",
              patch_embed: str = "linear") -> nn.Module:
    """Small Vision Transformer (:class:`VisionTransformer`) on image data sets (``digits``: 8x8, patch 4 gives
    4 patches; ``mnist``: 28x28, patch 4 gives 49, patch 7 gives 16)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (shape[0], 1, shape[1])
    if len(shape) != 3:
        raise ValueError(f"model 'vit' needs image inputs (C, H, W), but the data set gives examples of shape "
                         f"{shape}; use 'digits' or 'mnist'")
    return convert(VisionTransformer(shape, num_outputs, patch_size, d_model, nhead, num_layers, dim_feedforward,
                                     dropout, norm_first, activation, pool, patch_embed))
