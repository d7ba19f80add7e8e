"""Built-in curvature estimators (importing this package registers them)."""
from . import identity, isaac, kfac, miniblock, shampoo  # noqa: F401
