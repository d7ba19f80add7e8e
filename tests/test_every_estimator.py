"""Registry-wide tests: every registered estimator (built-in or plugin) is checked automatically."""
from __future__ import annotations

import pytest

import curvlab

pytest.importorskip("sklearn", reason="scikit-learn provides the bundled digits data set")
from helpers import DIGITS_MODELS, train_digits  # noqa: E402

ESTIMATORS = curvlab.ESTIMATORS.names()


@pytest.mark.parametrize("model_name", sorted(DIGITS_MODELS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_trains_digits_to_90_percent(estimator, model_name):
    hyper = dict(curvlab.ESTIMATORS.get(estimator).suggested)
    acc, opt = train_digits(estimator, 4, model=model_name, **hyper)
    print(f"{estimator} on {model_name}: {acc:.4f} after 4 epochs ({hyper})")
    assert opt.skipped_steps == 0
    assert acc >= 0.90, f"{estimator} reached only {acc:.4f} on the digits {model_name}"
