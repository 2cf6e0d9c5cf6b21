#!/usr/bin/env bash
# Install edlm-dist into the active Python environment (a venv you activated, or the system one),
# every distribution at the version pinned in constraints.txt (the lock; refresh: `make lock`).
# Order matters (STACK_NOTES): torch==2.13.0 first (the CPU wheel on a machine that offers one
# locally, else PyPI's build, CUDA on Linux), then DeepSpeed from its sdist without build
# isolation and without compiling ops (otherwise its build environment pulls a multi-GB CUDA
# torch), then the package itself. torch is named in every pip command, so no dependency can
# swap it for another build.
# EDLM_LOCK=none installs the newest releases that pyproject.toml's ranges allow instead of the
# lock (`make test-latest` does that in a throwaway venv).
# Idempotent: a stamp per Python environment skips the work when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
LOCK=${EDLM_LOCK:-constraints.txt}
if [ "$LOCK" = none ]; then
  pins=(--upgrade --upgrade-strategy eager)
elif [ -f "$LOCK" ]; then
  pins=(-c "$LOCK")
else
  echo "error: lock file '$LOCK' not found; run from a full clone, or set EDLM_LOCK=none for unpinned" >&2
  exit 2
fi
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

stamp=".install-stamp.$("$PYTHON" -c 'import hashlib,sys;print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])')"
want=$( (cat pyproject.toml scripts/install.sh scripts/build-tools.in; echo "$LOCK";
         [ "$LOCK" = none ] || cat "$LOCK") | "$PYTHON" -c "import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PYTHON" -c "import edlm_dist, deepspeed" 2>/dev/null; then
  exit 0
fi

echo "[install] torch==$TORCH_VERSION and build tools (${LOCK})"
pip_install "torch==$TORCH_VERSION" -r scripts/build-tools.in "${pins[@]}"
echo "[install] deepspeed (DS_BUILD_OPS=0, --no-build-isolation)"
DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed>=0.19.8,<0.20" "torch==$TORCH_VERSION" "${pins[@]}"
echo "[install] edlm-dist and its dependencies"
pip_install -e ".[dev]" "torch==$TORCH_VERSION" "${pins[@]}"
"$PYTHON" -c "import edlm_dist, torch, deepspeed, megatron.core; print('[install] ok: torch', torch.__version__)" \
  2>/dev/null || { echo "error: the install finished but edlm_dist, torch, deepspeed or megatron.core does not import; run: $PYTHON -c 'import edlm_dist, deepspeed, megatron.core'" >&2; exit 1; }
echo "$want" > "$stamp"
