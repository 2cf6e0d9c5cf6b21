"""The small shims Megatron-core 0.16 needs when CUDA is absent (STACK_NOTES "Megatron-core on CPU").

They are applied only when ``torch.cuda.is_available()`` is false, and only once:

1. ``torch.cuda.current_device`` returns the CPU device, because several tensor-parallel code
   paths allocate buffers with ``device=torch.cuda.current_device()`` (``gather_output=True``,
   sequence-parallel buffers).
2. Megatron's RNG tracker saves and restores CUDA generator state; on CPU it must fork the CPU
   generator instead, so TP-region dropout gets its own stream and activation recompute is exact.
3. ``get_default_causal_mask`` hard-codes ``device="cuda"``; we rebuild it on the CPU.
4. DeepSpeed's CPU communication backend JIT-compiles its shared-memory all-reduce op at start-up. Only
   ``inference_all_reduce`` (DeepSpeed-inference tensor parallelism, never used here) calls it, yet the
   compile takes minutes on 2 cores under a lock file in ``~/.cache/torch_extensions`` that every Python
   environment on the machine shares: a build from another venv, or one killed mid-way (a lock left
   behind), made every DeepSpeed start wait. Without the op, DeepSpeed falls back to the process group's
   all-reduce, which is what training calls anyway.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
from megatron.core.transformer import utils as mp_utils

try:
    from megatron.core.fusions import fused_softmax
except ImportError:  # fusions are optional in some Megatron builds
    fused_softmax = None

# by module name: the package attribute `deepspeed.comm.torch` is the torch library, not this module
ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Install the shims if CUDA is absent. Returns True when they are (or were) applied."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]

    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker  # picked up by initialize_rng_tracker

    @functools.lru_cache
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    mp_utils.get_default_causal_mask = cpu_causal_mask
    if fused_softmax is not None:
        fused_softmax.get_default_causal_mask = cpu_causal_mask
    ds_torch_comm.build_shm_op = lambda: None  # read at DeepSpeed's backend creation
    _APPLIED = True
    return True


class CpuRNGStatesTracker(CudaRNGStatesTracker):
    """Megatron's RNG tracker with named states kept as CPU generator states."""

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu").manual_seed(seed)  # CPU shim: the states are CPU states
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)
