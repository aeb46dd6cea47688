"""Benchmarks: scripts run from the repository root, `python -m bench.<name>` (or `python
bench/<name>.py` for those that import no other bench module), with results under `results/`."""
