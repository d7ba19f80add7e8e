"""Built-in curvature estimators (importing this package registers them)."""
from . import identity, kfac  # noqa: F401
