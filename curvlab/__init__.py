"""curvlab: composable second-order optimization for PyTorch.

Any (estimator, rule, scaling) triple from the registry is a ``torch.optim.Optimizer``::

    import curvlab
    opt = curvlab.optimizer(model, estimator="kfac", rule="natural", lr=0.1, damping=1e-3)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
"""
from .adapters import LayerAdapter, UnsupportedLayer
from .curvature import Curvature, Estimator
from .divergence import Diverged
from .hyper import HyperParameterError
from .linalg import FactorizationError
from .losses import LossMismatch
from .optim import CurvlabOptimizer, optimizer
from .step_guards import CaptureWarning
from .registry import (ADAPTERS, DATASETS, ESTIMATORS, MODELS, RULES, SCALINGS, describe, load_plugins,
                       register_adapter, register_dataset, register_estimator, register_model, register_rule,
                       register_scaling)
from .rules import Plan, UpdateRule
from .scalings import Parameterization
from .units import Unit

# ``curvlab.nn`` (attention conversion). Deliberately NOT in ``__all__``: ``from curvlab import *`` must not
# shadow a user's ``from torch import nn``. Inside curvlab, modules bind ``nn`` to torch.nn themselves.
from . import nn

__version__ = "0.1.0"

__all__ = [
    "optimizer", "CurvlabOptimizer", "CaptureWarning", "Diverged", "LossMismatch", "Estimator", "Curvature", "UpdateRule", "Plan", "Parameterization",
    "LayerAdapter", "Unit", "UnsupportedLayer", "FactorizationError", "HyperParameterError",
    "register_estimator", "register_rule", "register_scaling", "register_adapter", "load_plugins", "describe",
    "register_dataset", "register_model", "ESTIMATORS", "RULES", "SCALINGS", "ADAPTERS", "DATASETS", "MODELS",
]
