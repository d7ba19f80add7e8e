"""The muP rows of ``scaling="mup"`` (:mod:`curvlab.scalings.mup`): per weight layer, what width sets for each
estimator (Ishikawa & Karakida, ICLR 2024, arXiv 2312.12226, table 5.1; ALGORITHMS.md section 5, eqs. P.1-P.3).

:class:`Layer` is a weight layer as muP sees it (role, fan-in, widths, the ratios ``r_in`` / ``r_out`` and the
init std of eq. P.1); :class:`Scale` is what a row sets on one preconditioned unit (LR multiplier, damping
multiplier or per-side dampings, curvature attributes). :func:`register_mup_estimator` registers a row
``fn(layer, config) -> Scale`` in :data:`MUP_ESTIMATORS`; this module registers the rows of the built-in
estimators (``identity``, ``kfac``, ``shampoo``, ``isaac``, ``miniblock``), each derived in its docstring.
Plugins register theirs the same way (plugins/README.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..hyper import HyperParameterError

__all__ = ["ROLES", "INIT_EXPONENT", "Layer", "Scale", "MupRow", "MUP_ESTIMATORS", "register_mup_estimator"]

ROLES = ("input", "hidden", "output")
INIT_EXPONENT = {"input": 0.5, "hidden": 0.5, "output": 1.0}          # b of eq. P.1


@dataclass(frozen=True)
class Layer:
    """A weight layer as muP sees it (see the module doc for ``r_in`` / ``r_out``)."""

    name: str
    module: nn.Module
    role: str
    fan_in: int
    width_in: int
    width_out: int
    base_width: float

    @property
    def r_in(self) -> float:
        return 1.0 if self.role == "input" else self.width_in / self.base_width

    @property
    def r_out(self) -> float:
        return 1.0 if self.role == "output" else self.width_out / self.base_width

    @property
    def init_std(self) -> float:
        return self.fan_in ** -INIT_EXPONENT[self.role]


@dataclass(frozen=True)
class Scale:
    """What muP sets on one preconditioned unit (``None``: leave as is)."""

    lr_mult: float = 1.0
    damping_mult: float = 1.0
    damping_sides: tuple[float, float] | None = None
    damping_style: str | None = None
    #: ``{attribute: value}`` set on the unit's curvature, which must have the attributes (Shampoo's
    #: ``bias_scale``: the bias's own row; ISAAC's ``lambda_g_mult``)
    curvature_attrs: dict[str, Any] | None = None


MupRow = Callable[[Layer, dict[str, Any]], Scale]
MUP_ESTIMATORS: dict[str, MupRow] = {}


def register_mup_estimator(name: str) -> Callable[[MupRow], MupRow]:
    """Register ``fn(layer, config) -> Scale``: the muP row of estimator ``name`` (plugins use this)."""
    def decorator(fn: MupRow) -> MupRow:
        MUP_ESTIMATORS[name.lower()] = fn
        return fn
    return decorator


def _explicit_only(estimator: str, config: dict[str, Any], why: str) -> None:
    if config["mup_damping"] != "explicit":
        raise HyperParameterError(f"mup_damping={config['mup_damping']!r} applies to K-FAC only; with estimator "
                                  f"{estimator!r} leave mup_damping='explicit' ({why})")
    for key in ("mup_rho_A0", "mup_rho_B0"):
        if config[key] is not None:
            raise HyperParameterError(f"{key} sets K-FAC's per-side damping; estimator {estimator!r} has no such "
                                      f"side, leave {key}=None ({why})")


@register_mup_estimator("identity")
def _identity(layer: Layer, config: dict[str, Any]) -> Scale:
    """SGD muP (table 5.1, ``c = (-1, 0, 1)``): ``Delta W h' = eta delta (h . h')``, ``delta ~ 1/r_out``,
    ``|h|^2 ~ r_in``."""
    _explicit_only("identity", config, "it has no damping")
    return Scale(lr_mult=layer.r_out / layer.r_in)


@register_mup_estimator("kfac")
def _kfac(layer: Layer, config: dict[str, Any]) -> Scale:
    """K-FAC (table 5.1): LR multiplier 1; damping per ``mup_damping`` (module doc). With ``"explicit"`` the two
    base constants of eq. P.3 / 5.2 are ``rho_A0 = mup_rho_A0`` and ``rho_B0 = mup_rho_B0`` (``None``: ``damping``,
    i.e. tied, ``rho_A0 = rho_B0``); the reference code tunes them separately (``damping_A``, ``damping_B``, 5.1).
    They are carried as multiples of ``damping`` at creation, so a damping schedule scales both alike."""
    style, user = config["mup_damping"], config["damping_style"]
    if user not in ("pi", style):
        raise HyperParameterError(
            f"damping_style={user!r} conflicts with scaling='mup', which sets K-FAC's damping through mup_damping "
            f"(now {style!r}: one of 'explicit', 'pi', 'trace'); drop damping_style or choose mup_damping")
    rho_a0, rho_b0 = config["mup_rho_A0"], config["mup_rho_B0"]
    if style == "explicit":
        lam = config["damping"]
        if (rho_a0 is not None or rho_b0 is not None) and not lam > 0:
            raise HyperParameterError(f"mup_rho_A0 / mup_rho_B0 are carried as multiples of damping, which must then "
                                      f"be > 0 (got {lam!r}); set damping > 0")
        m_a = 1.0 if rho_a0 is None else rho_a0 / lam
        m_b = 1.0 if rho_b0 is None else rho_b0 / lam
        return Scale(damping_sides=(m_a * layer.r_in, m_b / layer.r_out), damping_style="explicit")
    if rho_a0 is not None or rho_b0 is not None:
        raise HyperParameterError(f"mup_rho_A0 / mup_rho_B0 set the explicit per-side damping; with "
                                  f"mup_damping={style!r} leave them None, or use mup_damping='explicit'")
    return Scale(damping_style=style)


@register_mup_estimator("shampoo")
def _shampoo(layer: Layer, config: dict[str, Any]) -> Scale:
    """Shampoo ``L^-e G R^-e``: one sample gives ``(|h| |delta|)^(1-4e) u v^T`` (5.1), hence ``(r_out/r_in)^(1-2e)``.

    Grafting replaces the step's norm by the grafted optimizer's, so the row becomes that optimizer's (5.6):
    ``"sgd"``: ``r_out / r_in``; ``"adagrad"`` (entries ~ +-1, like Adam-muP ``c = (0, 1, 1)``): ``1 / r_in``.
    Relative epsilon (default) is width-consistent; absolute epsilon is scaled by ``r_in / r_out``, the
    eigenvalue scale of ``L`` and ``R`` (table 5.1 ``{1/r, 1, r}``).

    Bias (its own row): a bias is a layer whose input is the constant 1, i.e. fan-in 1, ``|h| = 1``. Shampoo
    preconditions it with the DIAGONAL root ``(d + eps)^-2e``, ``d_i = g_i^2`` (the order-1 case of eq. S.3), so
    every coordinate is its own ``1 x 1`` Shampoo layer: the one-sample step ``(|h| |delta_i|)^(1-4e)`` of 5.1
    with ``|h| = 1`` and ``|delta_i| ~ 1/r_out`` (one coordinate of ``delta``) is ``r_out^-(1-4e)``, and it moves
    pre-activation coordinate ``i`` by itself, so the bias LR is ``r_out^(1-4e)`` (1 at ``e = 1/4``: the entries
    are ``+-1`` like Adam's). Sharing the weight's ``(r_out/r_in)^(1-2e)`` instead moves the input layer's
    pre-activations ``~ sqrt(r)`` too far and the output bias ``~ 1/sqrt(r)`` too little (coordinate check with
    biases, widths 64..1024: input-layer change 0.10 -> 0.27 before this row). Absolute epsilon: the bias
    eigenvalue scale ``g_i^2 ~ r_out^-2``. Grafting takes ONE norm over weight and bias, whose muP norms scale
    differently (``sqrt(r_out/r_in)`` and ``sqrt(r_out)``), so no multiplier makes it width-consistent: muP
    refuses grafting on layers with a bias."""
    _explicit_only("shampoo", config, "Shampoo's relative epsilon is width-consistent already")
    size = config["shampoo_block_size"]
    scaled = ([layer.width_out] if layer.role != "output" else []) + ([layer.fan_in] if layer.role != "input" else [])
    if scaled and max(scaled) > size:
        raise HyperParameterError(
            f"scaling='mup' with shampoo: layer {layer.name!r} has a width-dependent dimension {max(scaled)} > "
            f"shampoo_block_size={size}; the number of blocks would grow with width, which changes the muP "
            f"exponents. Set shampoo_block_size >= {max(scaled)}")
    ratio, graft, e = layer.r_out / layer.r_in, config["shampoo_grafting"], config["shampoo_exponent"]
    lr = {None: ratio ** (1.0 - 2.0 * e), "sgd": ratio, "adagrad": 1.0 / layer.r_in}[graft]
    absolute = config["shampoo_epsilon"] == "absolute"
    if getattr(layer.module, "bias", None) is None:
        return Scale(lr_mult=lr, damping_mult=layer.r_in / layer.r_out if absolute else 1.0)
    if graft is not None:
        raise HyperParameterError(
            f"scaling='mup' with shampoo_grafting={graft!r}: layer {layer.name!r} has a bias, and grafting rescales "
            "weight and bias by one norm although their muP update norms scale differently with width; use "
            "shampoo_grafting=None, layers without bias, or scaling='standard'")
    damping = layer.r_in / layer.r_out if absolute else 1.0
    bias_lr, bias_damping = layer.r_out ** (1.0 - 4.0 * e), layer.r_out ** -2 if absolute else 1.0
    return Scale(lr_mult=lr, damping_mult=damping,
                 curvature_attrs={"bias_scale": (bias_lr / lr, bias_damping / damping)})


@register_mup_estimator("isaac")
def _isaac(layer: Layer, config: dict[str, Any]) -> Scale:
    """ISAAC ``zeta* = lambda_a g (A + lambda_a I)^-1`` (eq. I.6, one-sided, with the ``lambda_a`` prefactor; 6.6).

    Input and hidden layers: ``lambda_a ~ r_in`` (the eigenvalue scale of ``A = X^T X / b``) makes
    ``lambda_a (A + lambda_a I)^-1`` a width-independent O(1) operator on the span of the inputs, so zeta* scales
    like the gradient: the SGD row ``r_out / r_in`` (input: ``lambda_a`` const, LR ``x r``; hidden: ``lambda_a x r``,
    LR const, as 6.6 says). Output layer (6.6): constant ``lambda_a`` and constant LR; there ``A``'s eigenvalues
    ``~ r`` dominate, ``zeta* ~ lambda_a g A^+`` moves the output by O(1). (``lambda_a x r`` with LR ``/ r`` has the
    same limit, but would also divide the LR of the plain, unpreconditioned output bias by ``r``.)
    Two-parameter zeta (``isaac_lambda_g``, eq. I.2): ``lambda_g ~ 1/r_out``, the eigenvalue scale of ``G`` (K-FAC's
    ``rho_B`` row), makes ``lambda_g (G + lambda_g I)^-1`` an O(1) operator, so the rows above are unchanged."""
    _explicit_only("isaac", config, "the width exponents of lambda_a are applied through damping")
    attrs = {"lambda_g_mult": 1.0 / layer.r_out} if config["isaac_lambda_g"] is not None else None
    if layer.role == "output":
        return Scale(curvature_attrs=attrs)
    return Scale(lr_mult=layer.r_out / layer.r_in, damping_mult=layer.r_in, curvature_attrs=attrs)


def _blocks_per_row(layer: Layer, cols: int, c_in: int, config: dict[str, Any]) -> int:
    """Mini-blocks per output row of the MBF layout (``miniblock.build_layout``) for ``cols`` matrix columns."""
    size, chunk = config["miniblock_size"], config["miniblock_chunk"] if config["miniblock_mode"] == "chunked" else None
    bias = int(getattr(layer.module, "bias", None) is not None)
    if layer.module.weight.dim() > 2 and config["miniblock_conv"] == "kernel":
        k2 = (cols - bias) // max(c_in, 1)
        return c_in * (math.ceil(k2 / chunk) if chunk else 1) + bias
    limits = [m for m in ((size if isinstance(size, int) else None), chunk) if m]
    return math.ceil(cols / min(limits)) if limits else 1


@register_mup_estimator("miniblock")
def _miniblock(layer: Layer, config: dict[str, Any]) -> Scale:
    """MBF, per-row empirical Fisher ``F_i = E[g_i^2 a a^T]`` (eq. M.4): the unit-wise Fisher, i.e. K-FAC with ``G``
    replaced by its diagonal, whose entries ``g_i^2 ~ 1/r_out^2`` are ``r_out`` times smaller than K-FAC's ``G``
    eigenvalue ``|g|^2 ~ 1/r_out``. Row ``i`` steps ``(a . h') / (g_i |a|^2) ~ 1/g_i``, so LR ``/ r_out``
    (``c = (1, 1, 0)``), and the block eigenvalue ``g_i^2 |a|^2`` sets the damping ``r_in / r_out^2``
    (``{1/r^2, 1/r, r}``). Rows cut into ``k`` chunks (int ``miniblock_size``, conv ``"kernel"``, ``"chunked"``
    mode) add ``k`` such terms per row with ``|a_c|^2 ~ r_in / k``: LR ``/ (k_ratio r_out)``, damping
    ``(r_in / k_ratio) / r_out^2`` (diagonal: ``c = (1, 2, 1)``). One block per layer is exact K-FAC's scale:
    LR 1, damping ``r_in / r_out``. ``miniblock_damping="relative"`` (``lambda mean(diag F_b)``) already carries
    ``1/dim(F_b)`` of the eigenvalue scale, so its multiplier is the block-dimension ratio. ``miniblock_mode=
    "auto"`` is assumed not to chunk; if it falls back to chunks for a layer (logged), set the mode explicitly."""
    _explicit_only("miniblock", config, "its width exponents are applied through damping")
    relative = config["miniblock_damping"] == "relative"
    r_in, r_out = layer.r_in, layer.r_out
    conv = layer.module.weight.dim() > 2
    one_block = (config["miniblock_conv"] if conv else config["miniblock_size"]) == "layer"
    if one_block and config["miniblock_mode"] != "chunked":
        return Scale(lr_mult=1.0, damping_mult=r_in * r_out if relative else r_in / r_out)
    bias = int(getattr(layer.module, "bias", None) is not None)
    c_in0 = max(1, round(layer.width_in / r_in))
    fan_in0 = max(1, round(layer.fan_in / r_in))
    k = _blocks_per_row(layer, layer.fan_in + bias, layer.width_in, config)
    k0 = _blocks_per_row(layer, fan_in0 + bias, c_in0, config)
    dim_ratio = r_in * k0 / k                       # block dimension ratio ~ |a_c|^2 ratio
    return Scale(lr_mult=k0 / (k * r_out), damping_mult=dim_ratio if relative else dim_ratio / r_out ** 2)

