"""Shared test setup: quiet third-party warnings, one thread per process unless OMP_NUM_THREADS says
otherwise (the portability runs set it to 2 to change reduction orders), `gpu` skipping."""

from __future__ import annotations

import os

THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (runs on GPU machines)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _preimport_heavy_modules() -> None:
    """Import Megatron/DeepSpeed once here so forked ranks (run_on_ranks) inherit them instead of
    each paying several seconds of imports on the 2-core machine."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        import deepspeed  # noqa: F401


_preimport_heavy_modules()
