"""Benchmarks for specdec (a source-checkout package: ``python -m benchmarks.run`` or ``specdec bench``)."""
