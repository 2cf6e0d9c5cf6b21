"""Distributed runtime: torch.distributed + Megatron-core parallel_state + seeding, in one place.

``init_parallel(cfg)`` reads the launcher's environment (torchrun, SLURM/submitit, or nothing for a
single process), starts the process group (gloo on CPU, NCCL on GPU), applies the CPU shims when
CUDA is absent, builds Megatron's TP/DP groups and seeds every generator. Everything else in the
package asks :class:`ParallelContext` for ranks and groups instead of touching globals.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import socket
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from edlm_dist.config.load import validate_world
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import ConfigError
from edlm_dist.parallel.cpu_shims import apply_cpu_shims
from edlm_dist.parallel.devices import fork_rng_devices, run_device


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self):
        return parallel_state.get_data_parallel_group()


# Rendezvous ports of SLURM jobs. Linux hands out ephemeral ports (every outgoing connection, gloo's pair
# sockets, srun's own listeners) from 32768 up by default (/proc/sys/net/ipv4/ip_local_port_range), so a
# port drawn there can already be taken on a busy node (seen: EADDRINUSE on submitit's port 48600).
JOB_PORT_RANGE = (20000, 32768)


def job_master_port(job_id: str, restarts: int = 0) -> int:
    """MASTER_PORT of a SLURM job: the same on every task (from SLURM_JOB_ID and SLURM_RESTART_COUNT only),
    below the ephemeral range, different for consecutive job ids and for each restart of one job (the
    tasks of the previous run may still hold their port while the requeued job starts)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    low, high = JOB_PORT_RANGE
    return low + (number + 4099 * int(restarts)) % (high - low)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist, e.g. ``node[003-005,9]`` -> ``node003``, ``r[1-2]n[0-3]`` -> ``r1n0``,
    ``node[1-4]-ib`` -> ``node1-ib``, ``gpu-[01-02],cpu1`` -> ``gpu-01`` (what ``scontrol show hostnames``
    lists first; parsed here because scontrol may be absent on the compute node or retry for a minute)."""
    head, depth = "", 0
    for char in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:  # the first comma outside brackets ends the first host group
            break
        head += char
    # every bracket contributes its first range's first value, zero padding kept
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], head)


def discover_environment() -> dict[str, int | str]:
    """Rank layout from torchrun/submitit (RANK...) or raw SLURM (SLURM_PROCID...), else one process.

    Fills RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in ``os.environ`` so that
    DeepSpeed (which reads them) sees the same layout.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(job_master_port(env.get("SLURM_JOB_ID", "0"),
                                                          int(env.get("SLURM_RESTART_COUNT", "0") or 0))))
    else:
        rank, world, local = 0, 1, 0
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise ConfigError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; launch with torchrun or set them")
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    return {"rank": rank, "world_size": world, "local_rank": local}


def choose_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA; use parallel.backend=gloo (or auto) on CPU")
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_parallel(cfg: RunConfig, *, training: bool = True) -> ParallelContext:
    """Initialise torch.distributed and Megatron-core for ``cfg.parallel``; idempotent.

    ``training=False`` (sampling, evaluation) skips the check that the training batch splits
    over the data-parallel ranks.
    """
    layout = discover_environment()
    backend = choose_backend(cfg.parallel.backend)
    validate_world(cfg, int(layout["world_size"]), training=training)
    device = run_device(int(layout["local_rank"]))
    if device.type == "cpu":
        apply_cpu_shims()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=int(layout["rank"]),
            world_size=int(layout["world_size"]),
            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
        )
    if not parallel_state.model_parallel_is_initialized() or (
        parallel_state.get_tensor_model_parallel_world_size() != cfg.parallel.tp
    ):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tp)
    ctx = ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(layout["local_rank"]),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
        backend=backend,
    )
    seed_for_rank(cfg.train.seed, ctx)
    return ctx


def rank_seed(seed: int, ctx: ParallelContext) -> int:
    """The seed of this DP rank's default generators (shared by the TP ranks of its replica)."""
    return seed + 1000003 * ctx.dp_rank


def seed_for_rank(seed: int, ctx: ParallelContext) -> None:
    """Default generators: one stream per DP rank, identical across the TP ranks of a group.

    TP ranks must draw the same noise (t, masks, dropout outside TP regions) because they hold
    shards of one model replica working on the same micro-batch; DP ranks must not, or every replica
    drops the same units. Megatron's ``model_parallel_cuda_manual_seed`` reseeds the CUDA default
    generator with the seed it gets, so it gets this rank's seed too (its TP-region stream adds the TP
    rank on top). On CPU its ``torch.cuda.manual_seed`` is a lazy no-op and the shims keep the
    TP-region stream on the CPU generator.
    """
    seed_everything(rank_seed(seed, ctx))
    model_parallel_cuda_manual_seed(rank_seed(seed, ctx), force_reset_rng=True)


@contextlib.contextmanager
def identical_on_every_rank(seed: int, device: Optional[torch.device] = None):
    """Draw from ``seed`` inside (initial weights: the same full model on every rank at any TP degree)
    and give every default generator its per-rank stream back afterwards (dropout differs across DP)."""
    with torch.random.fork_rng(devices=fork_rng_devices(device)):
        torch.manual_seed(seed)
        yield


def data_seed(seed: int, ctx: ParallelContext) -> int:
    """Seed of the data-order/noise generator of this DP rank (shared by its TP ranks)."""
    return seed + 7919 * ctx.dp_rank


def shutdown_parallel() -> None:
    """Tear down Megatron groups and the process group (avoids the gloo abort-at-exit flake)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a dead peer must not turn a clean shutdown into a hang
            pass
        dist.destroy_process_group()


def current_context() -> Optional[ParallelContext]:
    """The context of an initialised runtime, or None."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"),
        backend=dist.get_backend(),
    )
