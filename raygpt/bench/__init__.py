"""Benchmarks that print figures: `raygpt bench ...` and `python -m raygpt.bench.<name>`."""
