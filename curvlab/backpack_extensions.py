"""BackPACK module extensions and module tables used by :mod:`curvlab.backpack_capture`.

* :data:`HBP_MODULES`: modules BackPACK's K-FAC extensions (KFAC/KFLR, v1.7) back-propagate through, plus the
  elementwise activations and adaptive average pooling registered here from BackPACK's own derivatives;
* ``LinearFactors`` / ``Conv2dFactors``: K-FAC factors per layer; for Conv2d the output factor is KFC's
  ``T Gamma = sum_{m,n,t} S_t S_t^T`` (Grosse & Martens 2016, eq. C.4) instead of BackPACK's bias GGN
  ``sum_{m,n} (sum_t S_t)(sum_t S_t)^T``, which differs by the cross-location terms;
* ``StoredGradientLoss`` / ``StoredGradientSqrt``: a surrogate loss whose back-propagated square root is
  ``sqrt(N) dL/df``, giving the EMPIRICAL Fisher's factors through BackPACK's own backward.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

try:
    from backpack import backpack as _backpack_ctx
    from backpack import extend
    from backpack.core.derivatives.adaptive_avg_pool_nd import AdaptiveAvgPool2dDerivatives
    from backpack.core.derivatives.elu import ELUDerivatives
    from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
    from backpack.core.derivatives.logsigmoid import LogSigmoidDerivatives
    from backpack.core.derivatives.selu import SELUDerivatives
    from backpack.extensions import KFAC, KFLR, BatchGrad
    from backpack.extensions.module_extension import ModuleExtension
    from backpack.extensions.secondorder.hbp.conv2d import HBPConv2d
    from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
    from backpack.extensions.secondorder.hbp.linear import HBPLinear
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("capture='backpack' needs the package backpack-for-pytorch (pip install --no-deps "
                      "backpack-for-pytorch einops unfoldNd), or use capture='hooks'") from exc

#: Modules BackPACK's K-FAC extensions (KFAC/KFLR, v1.7) back-propagate through, plus the elementwise
#: activations and the adaptive average pooling this backend registers from BackPACK's own derivatives.
_EXTRA_HBP: dict[type[nn.Module], Callable[[], Any]] = {
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2dDerivatives, nn.ELU: ELUDerivatives,
    nn.LeakyReLU: LeakyReLUDerivatives, nn.SELU: SELUDerivatives, nn.LogSigmoid: LogSigmoidDerivatives,
}
HBP_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.Dropout, nn.Flatten, nn.ReLU, nn.Sigmoid, nn.Tanh,
    nn.Identity, *_EXTRA_HBP,
)
# -- BackPACK module extensions -------------------------------------------------------------------------
class Stashing:
    """Keeps each layer's back-propagated square root ``S``; skips BackPACK's bias factors (curvlab folds the
    bias into the homogeneous ``A``)."""

    def __init__(self, stash: dict[int, Tensor]) -> None:
        super().__init__()
        self._stash = stash

    def bias(self, ext, module, g_inp, g_out, backproped):
        self._stash[id(module)] = backproped


class LinearFactors(Stashing, HBPLinear):
    """BackPACK's Linear factors ``[G, A]``, unchanged."""

    def weight(self, ext, module, g_inp, g_out, backproped):
        self._stash[id(module)] = backproped
        return super().weight(ext, module, g_inp, g_out, backproped)


class Conv2dFactors(Stashing, HBPConv2d):
    """Conv2d factors ``[T Gamma, A]`` with KFC's ``T Gamma = sum_{m,n,t} S_t S_t^T`` (eq. C.4) in place of
    BackPACK's bias GGN ``sum_{m,n} (sum_t S_t)(sum_t S_t)^T``; ``A`` is BackPACK's."""

    def weight(self, ext, module, g_inp, g_out, backproped):
        self._maybe_raise_groups_not_implemented_error(ext, module)
        self._stash[id(module)] = backproped
        sqrt = backproped.flatten(start_dim=3)                                  # (M, N, C_out, T)
        return [torch.einsum("mnct,mndt->cd", sqrt, sqrt)] + self._factors_from_input(ext, module)


class StoredGradientLoss(_Loss):
    """Surrogate loss ``<f, w>``: its gradient with respect to the model output ``f`` is ``w = dL/df``."""

    def forward(self, out: Tensor, w: Tensor) -> Tensor:
        return (out * w).sum()


class StoredGradientSqrt(ModuleExtension):
    """Square root of the empirical Fisher's output factor: ``sqrt(N) dL/df_n = (1/sqrt(N)) grad l_n``."""

    def backpropagate(self, ext, module, g_inp, g_out, backproped):
        w = module.input1
        return (w * math.sqrt(w.shape[0])).unsqueeze(0)
