"""Registry-wide tests: every registered estimator (built-in or plugin) is checked automatically."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvlab

pytest.importorskip("sklearn", reason="scikit-learn provides the bundled digits data set")
from curvlab.data import batches, load_digits  # noqa: E402
from curvlab.models import mlp, small_cnn  # noqa: E402

ESTIMATORS = curvlab.ESTIMATORS.names()
MODELS = {
    "mlp": (lambda: mlp(64, 64, 2, 10, activation="tanh"), lambda x: x),
    "cnn": (lambda: small_cnn(1, 8, 10, image_size=8), lambda x: x.reshape(-1, 1, 8, 8)),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_trains_digits_to_90_percent(estimator, model_name):
    split = load_digits(seed=0)
    make_model, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make_model()
    hyper = dict(curvlab.ESTIMATORS.get(estimator).suggested)
    opt = curvlab.optimizer(model, estimator, "natural", **hyper)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for xb, yb in batches(split.x_train, split.y_train, 64, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(shape(xb)), yb).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(shape(split.x_test)).argmax(1) == split.y_test).float().mean().item()
    print(f"{estimator} on {model_name}: {acc:.4f} after 4 epochs ({hyper})")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0
    assert acc >= 0.90, f"{estimator} reached only {acc:.4f} on the digits {model_name}"
