"""The test suite and its harness (tests/spawn.py, tests/reliability/). A package so that the tools can reuse
the harness (``from tests.spawn import run_on_ranks``) when run from the repository root; the test folders
below it are not packages (pytest imports their modules by basename)."""
