# The README's two commands are `make demo` (the main job) and `make test` (the test suite).
# Both install what is missing first (scripts/install.sh is idempotent).
PYTHON ?= python3
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-latest lock lock-upgrade
install:
	@PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	OMP_NUM_THREADS=1 $(PYTHON) -m edlm_dist.cli pipeline configs/demo.yaml --out $(OUT)

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The lock (constraints.txt): `make lock` after changing dependencies in pyproject.toml (keeps every
# other pin); `make lock-upgrade` moves all pins to the newest releases the ranges allow.
lock:
	@PYTHON=$(PYTHON) bash scripts/lock.sh

lock-upgrade:
	@PYTHON=$(PYTHON) bash scripts/lock.sh --upgrade

# The suite against the newest releases the ranges allow, in a throwaway venv (the lock untouched).
test-latest:
	@PYTHON=$(PYTHON) bash scripts/test_latest.sh
