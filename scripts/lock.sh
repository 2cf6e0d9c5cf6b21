#!/usr/bin/env bash
# Refresh constraints.txt, the lock that scripts/install.sh installs through (`pip install -c`).
#   make lock           add what pyproject.toml now asks for; every other pin stays as it is
#   make lock-upgrade   move every pin to the newest release the ranges in pyproject.toml allow
# uv's universal resolution (every platform, Python >= 3.11) against PyPI. It therefore also pins
# torch's CUDA dependencies (nvidia-*, triton, cuda-*) for GPU machines; as pip *constraints* they
# only fix versions and install nothing that the torch build pip picks does not ask for.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if command -v uv >/dev/null 2>&1; then uv=(uv); else uv=("$PYTHON" -m uv); fi
if ! "${uv[@]}" --version >/dev/null 2>&1; then
  echo "error: uv is not installed; run 'make install' (uv is in the dev extra) or 'pip install uv'" >&2
  exit 2
fi
custom="make lock"; [[ " $* " == *" --upgrade "* ]] && custom="make lock-upgrade"
"${uv[@]}" pip compile pyproject.toml scripts/build-tools.in --all-extras --universal \
  --python-version 3.11 --custom-compile-command "$custom" --quiet "$@" -o constraints.txt
echo "[lock] constraints.txt: $(grep -c '^[A-Za-z]' constraints.txt) pinned distributions"
