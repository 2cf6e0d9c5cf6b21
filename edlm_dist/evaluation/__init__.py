"""Evaluation math: likelihood bounds (bounds), Gen PPL (genppl), entropy, reports.

Submodules are imported explicitly (e.g. `from edlm_dist.evaluation.bounds import ...`) so
that importing the package does not pull in transformers or matplotlib.
"""
