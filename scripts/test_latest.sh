#!/usr/bin/env bash
# The suite against the NEWEST releases that pyproject.toml's ranges allow, in a throwaway venv
# (`make test-latest`): shows the next drift before a user meets it. Prints every distribution
# whose version differs from the lock, then runs `make test` with that venv's Python.
# KEEP_VENV=DIR keeps the venv in DIR (reused when it exists) instead of a temporary one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${KEEP_VENV:-}" ]; then venv=$KEEP_VENV; else
  venv=$(mktemp -d)/venv; trap 'rm -rf "$(dirname "$venv")"' EXIT
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
EDLM_LOCK=none PYTHON="$venv/bin/python" bash scripts/install.sh
echo "[test-latest] versions that differ from constraints.txt (lock -> newest allowed):"
"$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null | "$venv/bin/python" -c '
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {}
for line in open("constraints.txt"):
    m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
    if m: lock.setdefault(norm(m.group(1)), set()).add(m.group(2))
for line in sys.stdin:
    name, _, version = line.strip().partition("==")
    pinned = lock.get(norm(name))
    if pinned is None: print(f"  {name} {version} (not in the lock)")
    elif version.split("+")[0] not in pinned: print(f"  {name} {sorted(pinned)[0]} -> {version}")
'
EDLM_LOCK=none make test PYTHON="$venv/bin/python"
