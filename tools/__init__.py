"""Benchmarks and reports (they print figures; tests never time things). Run them from the repository
root as modules, e.g. ``python -m tools.bench_frontier --runs runs/demo``; docs/benchmarks.md keeps
each figure with its command, machine and date."""
