#!/usr/bin/env bash
# Install edlm-dist into the active Python environment (a venv you activated, or the system one).
# Order matters (STACK_NOTES): torch==2.13.0 first (the CPU wheel here, the CUDA build on GPU
# machines), then DeepSpeed from its sdist without build isolation and without compiling ops
# (otherwise its build environment pulls a multi-GB CUDA torch), then the package itself.
# Idempotent: each step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

have() { "$PYTHON" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
name, want = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
v = md.version(name)
sys.exit(0 if want is None or v.split("+")[0] == want else 1)
PY
}

if ! have torch "$TORCH_VERSION"; then
  echo "[install] torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION" wheel setuptools
fi
have wheel || pip_install wheel
if ! have deepspeed; then
  echo "[install] deepspeed (DS_BUILD_OPS=0, --no-build-isolation)"
  DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed>=0.19.8,<0.20" "torch==$TORCH_VERSION"
fi
stamp=.install-stamp
want=$(cat pyproject.toml scripts/install.sh | "$PYTHON" -c "import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PYTHON" -c "import edlm_dist" 2>/dev/null; then
  echo "[install] edlm-dist and its dependencies"
  # torch stays pinned in the same command so that no dependency can swap it for another build.
  pip_install -e ".[dev]" "torch==$TORCH_VERSION"
  echo "$want" > "$stamp"
fi
"$PYTHON" -c "import edlm_dist, torch, deepspeed, megatron.core; print('[install] ok: torch', torch.__version__)" 2>/dev/null
