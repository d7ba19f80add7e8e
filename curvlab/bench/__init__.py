"""Benchmarks: curvlab step time against momentum SGD (and peer libraries), measured side by side.

:mod:`curvlab.bench.harness` is the importable part (``interleaved``, ``measure``, ``Variant``);
``curvlab bench`` (:mod:`curvlab.bench.cli`) prints the table and writes JSON.
"""
from .harness import Variant, interleaved, measure, paired_ratios

__all__ = ["Variant", "interleaved", "measure", "paired_ratios"]
