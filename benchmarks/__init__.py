"""Benchmarks of msc-detector, run as modules from the repository root.

``python -m benchmarks.one_class``, ``python -m benchmarks.compare``,
``python -m benchmarks.fitted_variants`` and ``python -m benchmarks.speed``; see
``benchmarks/README.md``.
"""
