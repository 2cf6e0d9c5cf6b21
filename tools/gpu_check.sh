#!/usr/bin/env bash
# One-shot GPU check (issue 21): runs unchanged the first time a GPU appears and prints what it saw.
#   tools/gpu_check.sh [WORKDIR]     (default: a fresh temporary directory)
# Each probe runs in its own process; a failing probe prints FAIL and the script goes on. Exit status:
# 0 when nothing failed, 1 otherwise, 2 without a GPU.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTORCH_NVML_BASED_CUDA_CHECK=1 WANDB_MODE=disabled
WORK="${1:-$(mktemp -d)}"; mkdir -p "$WORK"
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device is visible; run this on a GPU node (CUDA_VISIBLE_DEVICES, drivers)"; exit 2
fi
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
python - <<'PY'
import torch, deepspeed
from edlm_dist.training.peak_flops import peak_for_device_name
name = torch.cuda.get_device_name(0)
free, total = torch.cuda.mem_get_info(0)
print(f"INFO env: {name}, {torch.cuda.device_count()} GPU(s), capability {torch.cuda.get_device_capability(0)}, "
      f"{total / 2**30:.1f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda}), NCCL {torch.cuda.nccl.version()}, "
      f"deepspeed {deepspeed.__version__}, bf16 {torch.cuda.is_bf16_supported()}, MFU peak {peak_for_device_name(name)}")
PY
failed=0
run() { timeout "${2:-600}" python tools/gpu_check.py "$1" "$WORK" 2>"$WORK/$1.err" || { echo "FAIL probe $1 (exit $?): $(grep -v Warning "$WORK/$1.err" | tail -n 3 | tr '\n' ' ')"; failed=1; }; }
run data; run controls; run fork; run train; run apex; run inference
# Figures at GPT-2-small size (issue 18 item 4): training-step MFU of the DiT in bf16 (V = 50,258), and the
# sampler's seconds per sample at batch 1, L = 1024 (untrained weights: timing only); proposal scaling with >= 2 GPUs.
bench() { local name=$1 limit=$2; shift 2
  if timeout "$limit" python -m "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; then echo "INFO $name:"; sed 's/^/    /' "$WORK/$name.out"
  else echo "FAIL $name (exit $?): $(grep -v Warning "$WORK/$name.err" | tail -n 3 | tr '\n' ' ')"; failed=1; fi; }
bench bench_train 300 tools.bench_train --hidden 768 --blocks 12 --heads 12 --seq-len 1024 --batch 8 --vocab 50258 \
  --steps 10 --warmup 3 --skip-zero
SCALING=$([ "$GPUS" -ge 2 ] && echo "--ranks 2" || echo "--skip-scaling")
bench bench_sampler 300 tools.bench_sampler --random 768:12:1024:50258 --steps 64 --edlm 4:0.2 --samples 3 $SCALING
FIRST=$(python -c 'import os; print(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])')
CUDA_VISIBLE_DEVICES="$FIRST" run local_rank
# The suite's gpu tests, and the CPU tests that become CUDA/NCCL runs here (single rank everywhere on 1 GPU).
# Multi-rank tests put one rank per GPU (NCCL refuses two ranks on one GPU): they run where there are enough.
python -m pytest -q -p no:cacheprovider tests/gpu || { echo "FAIL pytest tests/gpu"; failed=1; }
TESTS="tests/models/test_apex_fallback.py tests/parallel/test_devices.py"
if [ "$GPUS" -ge 2 ]; then TESTS="$TESTS tests/parallel/test_bf16_masters.py tests/training/test_device_placement.py"; fi
if [ "$GPUS" -ge 4 ]; then TESTS="$TESTS tests/parallel/test_dropout_streams.py"; fi
MARK=$([ "$GPUS" -ge 2 ] && echo "gpu or not gpu" || echo "not multirank")
python -m pytest -q -p no:cacheprovider -m "$MARK" $TESTS || { echo "FAIL pytest: $TESTS"; failed=1; }
echo "NOT CHECKED here: item 11 (SLURM srun/node lists: tests/launchers); multi-node NCCL;"
[ "$GPUS" -lt 2 ] && echo "NOT CHECKED here: DP=2 bf16 masters and 2-rank placement tests (need 2 GPUs)"
[ "$GPUS" -lt 4 ] && echo "NOT CHECKED here: TP=2 x DP=2 dropout streams (item 6; needs 4 GPUs)"
echo "gpu_check: $([ $failed = 0 ] && echo 'no failures' || echo 'FAILURES above'); logs in $WORK"
exit $failed
