"""Evaluation: the math of each metric, and the runs that apply them to models and sample files.

Math (single device): ``bounds`` (Theorem-1 partition bounds), ``likelihood`` (Eq. 13 per row),
``genppl`` (Gen PPL), ``entropy``. Applied: ``sample_metrics`` (sample files and the data under an
oracle, split over ranks), ``run`` (``edlm eval``), ``report`` (tables, plots, metrics files).
Submodules are imported explicitly so that importing the package pulls in nothing heavy.
"""
