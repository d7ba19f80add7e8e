"""``python -m curvlab ...``: the ``curvlab`` command (what ``torchrun -m curvlab run CONFIG`` starts)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
