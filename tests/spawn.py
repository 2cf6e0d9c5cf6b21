"""Run a function on N local ranks (gloo on CPU) and bring back results or failures.

Used by the multi-rank tests and by single-node launches without torchrun. Each rank gets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in its environment, so the function simply
calls :func:`edlm_dist.parallel.runtime.init_parallel`. A rank's exception comes back with its
traceback. torch 2.13 + gloo processes sometimes abort *after* finishing (STACK_NOTES); an abort
that follows a reported success is tolerated, anything else fails loudly. Results travel pickled by
value: torch's queue pickler would pass tensors as file descriptors that the parent must fetch
from the rank, which has exited by then (an EOFError under load).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional


class RankFailure(AssertionError):
    """A rank raised, died, or did not finish in time."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn, rank, world_size, port, args, kwargs, results, extra_env) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    os.environ.update(extra_env or {})
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(*args, **kwargs)
        results.put(("ok", rank, pickle.dumps(value)))  # by value: the rank exits right after
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put(("error", rank, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                from edlm_dist.parallel.runtime import shutdown_parallel

                shutdown_parallel()
        except BaseException:  # noqa: BLE001
            pass
    # Flush the queue's feeder thread, then skip interpreter teardown: that is where the gloo
    # abort-at-exit flake lives.
    results.close()
    results.join_thread()
    os._exit(0)


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    start_method: str = "fork",
    env: Optional[dict[str, str]] = None,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` processes; return the per-rank results.

    ``fork`` is the default because it avoids re-importing torch in every rank (seconds on a
    2-core machine); the caller must not have initialised torch.distributed itself.
    """
    import torch.distributed as dist

    if start_method == "fork" and dist.is_available() and dist.is_initialized():
        raise RuntimeError("run_on_ranks(fork) called from a process that already initialised torch.distributed")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, kwargs, results, env), daemon=False)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise RankFailure(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                status, rank, value = results.get(timeout=min(remaining, 1.0))
                outcome[rank] = (status, value)
                if status == "error":
                    break  # fail fast: peers of a failed rank may block in a collective
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in outcome]
                if dead:
                    time.sleep(0.5)  # a result may still be in flight
                    while True:
                        try:
                            status, rank, value = results.get_nowait()
                            outcome[rank] = (status, value)
                        except queue.Empty:
                            break
                    dead = [r for r in dead if r not in outcome]
                    if dead:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RankFailure(f"ranks {dead} died without reporting (exit codes {codes})")
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outcome) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = {r: v for r, (s, v) in outcome.items() if s == "error"}
    if errors:
        rank = min(errors)
        raise RankFailure(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]
