"""Benchmarks of DESIGN section 7 ("Budgets"): run with ``python -m benchmarks [NAME ...]``.

Every number is reported next to a baseline measured in the same run, as a ratio; nothing here
asserts absolute timings. See ``benchmarks/README.md``.
"""
