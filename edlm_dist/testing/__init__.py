"""Reliability tooling: the fault and bad-input scenarios behind ``tools/fault_report.py`` and
``tests/reliability`` (see docs/reliability.md)."""
