"""Where generators and collective tensors live: one helper for each, so no line picks a device by habit.

On a GPU run every tensor a collective sees must sit on the GPU (NCCL has no CPU path) and every
generator that draws CUDA noise must be a CUDA generator ("Expected a 'cuda' device type for
generator"). On CPU both are the CPU, which is why a missing ``device=`` never shows in CPU runs. So:

* :func:`device_generator` builds every seeded generator of a run on the run's device;
* :func:`collective_device` is the device a process group's backend reduces on (NCCL: this rank's
  GPU; gloo: the CPU), and :mod:`edlm_dist.parallel.collectives` builds its tensors there;
* :func:`generator_state` / :func:`restore_generator` carry a generator through a checkpoint, and
  decide what happens when a run resumes on another device type (below);
* :func:`cuda_device_index` maps a rank to the GPU it drives, also when the scheduler binds one GPU
  per task.

Moving a checkpoint between CPU and GPU: the weights, optimizer, EMA and loader position move
unchanged. A generator's state does not: a CPU generator holds a Mersenne-Twister state and a CUDA
generator a (seed, offset) pair, and the two draw different numbers from the same seed anyway. A
resumed run on the other device type therefore reseeds its noise stream from (seed, step) — still
deterministic, still distinct per data-parallel rank, but not the stream the first device would have
drawn — and says so once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from edlm_dist.errors import ConfigError


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: the only way a run builds one."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def generator_state(generator: torch.Generator) -> dict:
    """A checkpointable state that remembers the device type it came from."""
    return {"device_type": generator.device.type, "state": generator.get_state()}


def restore_generator(generator: torch.Generator, saved, reseed: int) -> bool:
    """Restore ``saved`` (from :func:`generator_state`, or a bare CPU state of older checkpoints) into
    ``generator``; when it was saved on another device type, reseed with ``reseed`` instead.

    Returns True when the saved stream was restored, False when it was reseeded.
    """
    if isinstance(saved, torch.Tensor):  # checkpoints written before states carried their device type
        saved = {"device_type": "cpu", "state": saved}
    if saved["device_type"] == generator.device.type:
        generator.set_state(saved["state"])
        return True
    generator.manual_seed(int(reseed))
    return False


def collective_device(group=None) -> torch.device:
    """The device a collective over ``group`` must use: this rank's GPU for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU ordinal rank ``local_rank`` of its node drives, given ``visible`` GPUs.

    One visible GPU means the scheduler bound one GPU per task (SLURM ``--gpus-per-task=1`` sets
    CUDA_VISIBLE_DEVICES per task): it is ordinal 0 whatever the local rank. Otherwise local rank r
    drives GPU r, and more ranks than GPUs on a node is an error (two ranks on one GPU make NCCL fail
    later with a less readable message).
    """
    if visible < 1:
        raise ConfigError("CUDA is available but no GPU is visible; check CUDA_VISIBLE_DEVICES")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ConfigError(f"local rank {local_rank} has no GPU of its own: this node shows {visible} GPUs; "
                          f"start at most {visible} tasks per node (or bind one GPU per task)")
    return local_rank


def run_device(local_rank: int) -> torch.device:
    """This rank's device: its GPU (made current) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = cuda_device_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_rank(device: torch.device) -> int:
    """The device ordinal DeepSpeed must use (it would otherwise take LOCAL_RANK, see build_engine)."""
    return device.index if device.type == "cuda" and device.index is not None else 0


def fork_rng_devices(device: Optional[torch.device]) -> list:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must save besides the CPU one."""
    return [device] if device is not None and device.type == "cuda" else []
