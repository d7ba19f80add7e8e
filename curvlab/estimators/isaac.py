"""ISAAC: input-based approximate curvature (Petersen, Sutter, Borgelt, Huh, Kuehne, Sun, Deussen; ICLR 2023,
"ISAAC Newton: Input-based Approximate Curvature for Newton's Method"; ALGORITHMS.md section 6).

One-sided curvature from the layer inputs only. With ``X`` the ``R x n`` input rows of the last statistics
step (``R = N`` for a Linear layer on 2-D input, ``R = N T`` im2col patches for Conv2d / sequences), ``b``
the averaging count and ``lambda_a`` the pinned ``damping``, the curvature in the row-major matrix view of
the layer's preconditioned columns is ``C = I_{d_out} (x) A`` with ``A = X^T X / b``, and (eq. I.6, Theorem 3)::

    solve(V) = lambda_a V (lambda_a I_n + X^T X / b)^{-1}  =  lambda_a (C + lambda_a I)^{-1} V
             = V - (V X^T) (b lambda_a I_R + X X^T)^{-1} X                       (Woodbury, Theorem 1)
    mv(V)    = V X^T X / b = C V           (undamped)
    dense()  = I_{d_out} (x) A             (in the module's parameter order)

On the mean-loss gradient ``grad_W = Gout^T X`` this is ISAAC's ``zeta* = lambda_a Gout^T (lambda_a I_b +
X X^T / b)^{-1} X``. The leading ``lambda_a`` makes ``lambda_a -> inf`` recover the plain gradient (I.4), so
learning rates stay comparable to SGD's. ``solve`` accepts ANY ``V`` (rules such as FOP call it on other
vectors). Only the weight update changes: curvlab never touches autograd, so ``p.grad`` and the gradient
back-propagated to earlier layers and to the model input are the ordinary ones (pitfall of section 6.6).

Options (each a documented reading of a [U] choice; defaults follow the official code):

* ``isaac_branch``: ``"auto"`` (default) uses the ``R x R`` Woodbury form when ``R < n`` and the ``n x n``
  direct form otherwise (the official code's rule, I.7); ``"woodbury"`` / ``"direct"`` force one. Both are
  Cholesky solves (never an explicit inverse); a failed Cholesky falls back to the numerics ladder of
  :func:`curvlab.linalg.spd_inverse` and is reported as a ``NumericsEvent``.
* ``isaac_bias``: ``"plain"`` (default, official code: ``grad_b = Gout.sum(0)`` is not preconditioned) or
  ``"homogeneous"`` (the ones column of the adapter's homogeneous inputs is part of ``X``). In ``"plain"``
  the bias column (the LAST column of the matrix view) has curvature 0: ``mv`` returns 0 there, ``dense()``
  has zero rows/columns for the bias, and ``solve`` returns it unchanged, which is exactly
  ``lambda_a (0 + lambda_a)^{-1} = 1``, so ``solve = lambda_a (C + lambda_a I)^{-1}`` holds on the whole layer.
* ``isaac_average``: ``"examples"`` (default): ``b = N``, the number of examples, the same normalisation
  as K-FAC's ``A`` (eq. K.3 / C.4), so ISAAC is exactly K-FAC with ``G = I`` also for convolutions;
  ``"rows"``: ``b = N T`` (every patch a sample, ALGORITHMS 6.2 extension), which makes ``A`` the mean patch
  second moment and ``lambda_a`` comparable across spatial sizes. Identical for a Linear layer on 2-D input.
* ``isaac_ema``: ``False`` (default, official method): only the inputs of the last statistics step are
  used, ``ema_decay`` is ignored and the factorization is redone on every statistics step (with the
  current ``damping``); ``inv_interval`` has no effect. ``True``: ``A`` is an EMA of ``X^T X / b`` with
  ``ema_decay`` (a FOOF / "K-FAC with G = I" variant, not the paper's method); only the direct branch is
  possible then, and the factorization is refreshed every ``inv_interval`` steps as for K-FAC.

* ``isaac_lambda_g``: ``None`` (default) is ISAAC's ``zeta*`` (Theorem 3, ``lambda_g -> inf``); a number gives
  the two-parameter ``zeta`` of eq. I.2, ``lambda_g lambda_a (G + lambda_g I)^-1 grad_W (A + lambda_a I)^-1``,
  with ``G = Gbar^T Gbar / b`` K-FAC's output factor from the ``fisher`` vectors (``mc``: sampled labels,
  the paper's ``Gbar``; ``type2``; ``empirical``), of the current batch (EMA'd with ``isaac_ema``), inverted
  directly (``d_out x d_out``, Cholesky). The output side acts on the preconditioned columns only (a
  ``"plain"`` bias stays the plain gradient, as in ``zeta*``). Then ``solve = lambda_a (C + lambda_a I)^-1``
  still holds with ``C = I (x) A + G (x) (A + lambda_a I) / lambda_g`` (``mv``, ``dense``), which is ``I (x) A``
  at ``lambda_g = inf``. ``lambda_g`` is absolute, times ``lambda_g_mult`` (1; muP sets ``1 / r_out``, the
  eigenvalue scale of ``G``, as for K-FAC's ``rho_B``). ``isaac_lambda_g=None`` is bit for bit ``zeta*``.

``damping`` must be > 0 (with ``lambda_a = 0`` the step is the projection of ``V`` onto the null space of
``X``, which is 0 for the gradient). Cost per layer and step: forming ``X X^T`` (``R^2 n``) and its Cholesky
(``R^3 / 3``) plus two products with ``V`` (``2 d_out R n``) in the Woodbury branch; ``R n^2 + n^3 / 3 +
d_out n^2`` in the direct branch. Nothing but ``X`` (or ``A``) and one factor is kept across steps.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..curvature import Curvature, Estimator
from ..hyper import HyperParameterError, Option, boolean, one_of, optional_positive
from ..kernels import gram
from ..linalg import NumericsEvent, add_diagonal, spd_inverse, symmetrize
from ..registry import register_estimator
from ..stats import LayerStats


_INV_MAX = 256   # systems up to this size keep an explicit inverse (R^3 once, one GEMM per solve)


def _spd_factor(m: torch.Tensor, layer: str, events: list[NumericsEvent]) -> tuple[str, torch.Tensor]:
    """``("chol", L)`` with ``m = L L^T``; if Cholesky fails, ``("inv", m^-1)`` from the numerics ladder."""
    s = symmetrize(m)
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        return "chol", chol
    return "inv", spd_inverse(s, layer, events)


def _spd_solve(factor: tuple[str, torch.Tensor], rhs: torch.Tensor) -> torch.Tensor:
    """``m^-1 rhs`` for a factor from :func:`_spd_factor`."""
    kind, mat = factor
    return torch.cholesky_solve(rhs, mat) if kind == "chol" else mat @ rhs


class IsaacCurvature(Curvature):
    """``I (x) X^T X / b`` of one Linear / Conv2d layer, solved as ISAAC's zeta* (eq. I.6)."""

    #: data parallel (:mod:`curvlab.distributed`): the rows X / sqrt(b) are gathered over ranks (b -> global),
    #: the EMA variant's A is a mean; refresh sets ``cache``
    reductions = {"X": "cat_rms", "A": "mean_sym"}
    refreshed = ("cache",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bias_plain = self.adapter.has_bias(self.module) and self.config["isaac_bias"] == "plain"
        self.n = self.shape[1] - int(self.bias_plain)          # preconditioned columns
        self.X: torch.Tensor | None = None                     # X / sqrt(b), (R, n)   (batch mode)
        self.A: torch.Tensor | None = None                     # EMA of X^T X / b      (isaac_ema)
        self.cache: dict[str, Any] = {}                        # branch, lam, factor (+ lam_g, factor_g)
        self.lambda_g: float | None = self.config["isaac_lambda_g"]
        self.G: torch.Tensor | None = None                     # output factor (two-parameter zeta only)
        #: multiplier of ``isaac_lambda_g`` (set by a parameterization: muP)
        self.lambda_g_mult: float = 1.0

    # -- statistics ------------------------------------------------------------------------------------
    def statistics(self, stats: LayerStats) -> dict[str, torch.Tensor]:
        rows = stats.input_rows()                              # (N, T, d_in [+1])
        if self.bias_plain:
            rows = rows[..., :-1]
        n_ex, t, d = rows.shape
        b = n_ex * (t if self.config["isaac_average"] == "rows" else 1)
        x = rows.reshape(n_ex * t, d) / math.sqrt(b)          # so that X^T X / b = x^T x
        out = {"A": x.T @ x} if self.config["isaac_ema"] else {"X": x}
        if self.lambda_g is not None:
            kind = "real" if self.config["fisher"] == "empirical" else "fisher"
            out["G"] = stats.kron_factors(kind)[1]
        return out

    def accumulate(self, new: dict[str, torch.Tensor], ema_decay: float) -> None:
        ema = self.config["isaac_ema"]
        if "G" in new:
            self.G = self.ema(self.G, new["G"], ema_decay) if ema else new["G"]
        if ema:
            self.A = self.ema(self.A, new["A"], ema_decay)
            return
        self.X = new["X"]                                      # official method: current batch only
        self.cache = {}                                        # the factor belongs to the batch: redo now

    @property
    def ready(self) -> bool:
        return bool(self.cache)

    def refresh(self, damping: float) -> None:
        if not damping > 0:
            raise ValueError(f"layer {self.name!r}: the isaac estimator needs damping (lambda_a) > 0, got "
                             f"{damping!r}; the paper's range is 1e-6..1e6, start at 1 (ALGORITHMS 6.3)")
        if self.A is None and self.X is None:
            return
        if self.config["isaac_ema"]:
            branch, m = "direct", add_diagonal(self.A, damping)
        else:
            rows = self.X.shape[0]
            branch = self.config["isaac_branch"]
            if branch == "auto":
                branch = "woodbury" if rows < self.n else "direct"
            m = add_diagonal(gram(self.X.T) if branch == "woodbury" else gram(self.X), damping)
        factor = _spd_factor(m, f"{self.name} (isaac {branch})", self.events)
        if factor[0] == "chol" and m.shape[0] <= _INV_MAX:
            # small systems: keep the explicit inverse, so every solve is one GEMM (cholesky_solve with many
            # right-hand sides in row-major layout copies and runs ~20x slower on CPU)
            factor = ("inv", torch.cholesky_inverse(factor[1]))
        self.cache = {"branch": branch, "lam": float(damping), "factor": factor}
        if self.lambda_g is not None and self.G is not None:
            lam_g = self.lambda_g * self.lambda_g_mult
            factor_g = _spd_factor(add_diagonal(self.G, lam_g), f"{self.name} (isaac G side)", self.events)
            if factor_g[0] == "chol" and self.G.shape[0] <= _INV_MAX:
                factor_g = ("inv", torch.cholesky_inverse(factor_g[1]))
            self.cache.update(lam_g=lam_g, factor_g=factor_g)

    @property
    def branch(self) -> str | None:
        """The branch of the current factorization (``"woodbury"`` or ``"direct"``), ``None`` before one."""
        return self.cache.get("branch")

    # -- operators -------------------------------------------------------------------------------------
    def _split(self, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (mat[:, :-1], mat[:, -1:]) if self.bias_plain else (mat, None)

    @staticmethod
    def _join(part: torch.Tensor, bias_col: torch.Tensor | None) -> torch.Tensor:
        return part if bias_col is None else torch.cat([part, bias_col], dim=1)

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        if not self.cache:
            raise RuntimeError(f"layer {self.name!r}: isaac has no factorization yet; run a forward/backward "
                               "and opt.step() (or opt.update_curvature() then opt.refresh())")
        part, rest = self._split(mat)
        factor, lam = self.cache["factor"], self.cache["lam"]
        if self.cache["branch"] == "woodbury":
            # lambda V (lambda I + x^T x)^-1 = V - (V x^T) (lambda I_R + x x^T)^-1 x   (Woodbury, eq. I.3)
            coef = _spd_solve(factor, (part @ self.X.T).T).T
            out = part - coef @ self.X
        else:
            out = _spd_solve(factor, part.T).T * lam
        if "factor_g" in self.cache:                          # eq. I.2: lambda_g (G + lambda_g I)^-1 on the left
            out = _spd_solve(self.cache["factor_g"], out) * self.cache["lam_g"]
        return self._join(out, rest)                          # plain bias: unchanged

    def _gram(self) -> torch.Tensor:
        if self.A is not None:
            return self.A
        if self.X is None:
            raise RuntimeError(f"layer {self.name!r} has no isaac statistics yet: run a forward/backward first")
        return self.X.T @ self.X

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        part, rest = self._split(mat)
        if self.A is not None:
            out = part @ self.A
        elif self.X is not None:
            out = (part @ self.X.T) @ self.X
        else:
            raise RuntimeError(f"layer {self.name!r} has no isaac statistics yet: run a forward/backward first")
        if self.lambda_g is not None:                         # + G V (A + lambda_a I) / lambda_g (module doc)
            lam, lam_g = self._lambdas()
            out = out + self.G @ (out + lam * part) / lam_g
        return self._join(out, None if rest is None else torch.zeros_like(rest))   # plain bias: C = 0

    def damped_mv(self, mat: torch.Tensor) -> torch.Tensor:
        """The matrix ``solve`` inverts: ``(C + lambda_a I) / lambda_a`` (FOP's ``fop_metric="damped"``)."""
        if not self.cache:
            raise RuntimeError(f"layer {self.name!r}: isaac has no factorization yet; refresh first")
        return self.mv(mat) / self.cache["lam"] + mat

    def _lambdas(self) -> tuple[float, float]:
        if "lam_g" not in self.cache or self.G is None:
            raise RuntimeError(f"layer {self.name!r}: the two-parameter zeta's curvature depends on lambda_a and "
                               "lambda_g; run opt.step() (or opt.update_curvature() then opt.refresh()) first")
        return self.cache["lam"], self.cache["lam_g"]

    def dense(self) -> torch.Tensor:
        second = self._gram()
        cols = self.shape[1]
        a = second.new_zeros(cols, cols)
        a[: self.n, : self.n] = second
        eye = torch.eye(self.shape[0], dtype=second.dtype, device=second.device)
        c = torch.kron(eye, a)
        if self.lambda_g is not None:
            lam, lam_g = self._lambdas()
            damped = a.clone()
            damped[: self.n, : self.n] += lam * torch.eye(self.n, dtype=a.dtype, device=a.device)
            c = c + torch.kron(self.G, damped) / lam_g
        return self._param_dense(c)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"X": self.X, "A": self.A, "G": self.G, "cache": dict(self.cache)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.X, self.A, self.cache = state["X"], state["A"], dict(state["cache"])
        self.G = state.get("G")


@register_estimator("isaac")
class ISAAC(Estimator):
    """ISAAC zeta* (Petersen et al., ICLR 2023, eq. I.6): input-only curvature, lambda_a = ``damping``."""

    options = {
        "isaac_branch": Option("auto", one_of("auto", "woodbury", "direct"),
                               "'auto': R x R Woodbury solve when rows R < input dim n, else n x n; or force one"),
        "isaac_bias": Option("plain", one_of("plain", "homogeneous"),
                             "'plain': bias gradient not preconditioned (official code); 'homogeneous': ones column in X"),
        "isaac_average": Option("examples", one_of("examples", "rows"),
                                "b in X^T X / b: number of examples N (as K-FAC's A) or rows N*T (conv/sequence)"),
        "isaac_ema": Option(False, boolean,
                            "False: current batch only, ema_decay ignored (official); True: EMA of X^T X / b"),
        "isaac_lambda_g": Option(None, optional_positive,
                                 "None: zeta* (lambda_g = inf, eq. I.6); a number: the two-parameter zeta of eq. I.2 "
                                 "with output-side damping lambda_g (needs fisher vectors)"),
        "isaac_fused": Option(False, boolean,
                              "True: zeta* computed inside backward instead of the weight gradient (Linear layers, "
                              "rules natural/sngm; weight .grad then holds the ISAAC direction; "
                              "curvlab.estimators.isaac_fused)"),
    }
    # The official MNIST example's values (lr 1.0, lambda_a 10, plain SGD). Digits MLP / CNN, batch 64, 4 epochs,
    # 3 seeds: 0.969-0.980 / 0.947-0.960 test accuracy; lr in [0.5, 2] x damping in [3, 30] all reach >= 0.88,
    # while momentum-free SGD at lr 1.0 diverges on the CNN (0.10) and peaks at lr 0.3 (0.87-0.96).
    suggested = {"lr": 1.0, "damping": 10.0, "momentum": 0.0}
    #: README "Defaults": the official values. lambda_a is not a Tikhonov term on the Fisher's scale: at the common
    #: 1e-3 the step is nearly the projection of the gradient onto the null space of the inputs (digits MLP: 16%
    #: after 3 epochs), and no KL clip (lr 1 is SGD-like; kappa 1e-3 holds it to 0.64-0.93); momentum 0.5 (0 leaves
    #: the digits MLP 64-64-64-64-10 at batch 256, 18 steps, at 0.90). Under rule="qmodel" lambda_a also damps the
    #: quadratic model, where 10 over-damps the step (0.75-0.97; 1.0: 0.95-0.99)
    defaults = {"lr": 1.0, "damping": 10.0, "momentum": 0.5, "kl_clip": None}
    rule_defaults = {"qmodel": {"damping": 1.0}}
    fisher_types = ("empirical", "mc", "type2")               # used only by the two-parameter zeta (isaac_lambda_g)
    curvature_class = IsaacCurvature

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if config["isaac_ema"] and config["isaac_branch"] == "woodbury":
            raise HyperParameterError("isaac_branch='woodbury' needs the batch inputs, which isaac_ema=True does "
                                      "not keep; use isaac_branch='auto' or 'direct' with isaac_ema=True")

        if config["isaac_fused"]:
            if config["isaac_lambda_g"] is not None:
                raise HyperParameterError("isaac_fused=True computes zeta* (lambda_g = inf) inside backward; the "
                                          "two-parameter zeta (isaac_lambda_g) needs the output factor G: set "
                                          "isaac_lambda_g=None or isaac_fused=False")
            if config["isaac_ema"]:
                raise HyperParameterError("isaac_fused=True uses the current batch inside backward; it has no "
                                          "isaac_ema=True variant")
            if config["kl_clip"] is not None:
                raise HyperParameterError("isaac_fused=True cannot be combined with kl_clip (the KL clip needs the "
                                          "plain gradient, which the fused backward does not form)")
            self.provides = frozenset({"solve"})

    def create(self, name: str, module: torch.nn.Module, adapter: Any, events: list[NumericsEvent]) -> Curvature:
        if self.config["isaac_fused"]:
            from .isaac_fused import FusedIsaacCurvature
            return FusedIsaacCurvature(name, module, adapter, self.config, events)
        return super().create(name, module, adapter, events)

    def captures(self) -> set[str]:
        if self.config["isaac_fused"]:
            return set()
        if self.config["isaac_lambda_g"] is None:
            return {"inputs"}
        return {"inputs", "real_grads" if self.config["fisher"] == "empirical" else "fisher_grads"}
