"""Shared test setup: quiet third-party warnings, one thread per process unless OMP_NUM_THREADS says
otherwise (the portability runs set it to 2 to change reduction orders), `gpu` skipping.

Nothing here may decide for a GPU machine what only a CPU machine wants: DeepSpeed's accelerator is
chosen by ``edlm_dist.parallel.deepspeed_engine`` from the hardware (never forced to ``cpu``), and the
CUDA availability check goes through NVML so that it does not initialise CUDA in this process, whose
forked children (tests/spawn.py ranks) could then not use CUDA ("Cannot re-initialize CUDA in forked
subprocess").
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # before anything asks torch.cuda.is_available()
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
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
        if item.get_closest_marker("gpu") is not None:  # the marker, not a keyword (a folder named gpu is one)
            item.add_marker(skip_gpu)


def _preimport_heavy_modules() -> None:
    """Import Megatron/DeepSpeed once here so forked ranks (run_on_ranks) inherit them instead of
    each paying several seconds of imports on the 2-core machine."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401

        import edlm_dist.parallel.deepspeed_engine  # noqa: F401 - sets DS_ACCELERATOR, then imports DeepSpeed


_preimport_heavy_modules()
