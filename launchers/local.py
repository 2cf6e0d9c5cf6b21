"""One node, N processes: ``edlm train`` (or another ``edlm`` command) on every local GPU / CPU rank.

    python launchers/local.py CONFIG --out DIR --nproc N [key=value ...]

A minimal ``torchrun --standalone``: N children ``python -m edlm_dist.cli train CONFIG --out DIR ...``
with RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, which
:func:`edlm_dist.parallel.runtime.init_parallel` reads (gloo on CPU, NCCL on GPU; one GPU per
LOCAL_RANK). The config is validated for N processes before anything starts.

* SIGTERM / SIGUSR1 sent to the launcher go to every rank: the trainer checkpoints after the
  current step and the ranks exit with ``REQUEUE_EXIT_CODE`` (3), which the launcher returns —
  rerun the same command to resume.
* A rank that fails takes the others down (SIGTERM, then SIGKILL after a grace period) instead
  of leaving them blocked in a collective; the launcher returns the failing rank's exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python launchers/local.py`: make `edlm_dist` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edlm_dist.errors import REQUEUE_EXIT_CODE, ConfigError, EdlmError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the trainer's "checkpoint and stop" signals
GRACE_S = 5.0  # after a rank failed: time the others get to exit on SIGTERM before SIGKILL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, nproc: int, port: int, base: Optional[dict] = None) -> dict[str, str]:
    """The torchrun variables for local rank ``rank`` of ``nproc`` (single node: global == local)."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # N ranks share the node's cores; without this each would start one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def combined_exit_code(codes: Sequence[int]) -> int:
    """0 if every rank succeeded; a real failure wins over a preemption (3), which wins over success."""
    failures = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    if failures:
        return failures[0]
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def launch(command: Sequence[str], nproc: int, *, port: Optional[int] = None, grace_s: float = GRACE_S,
           env: Optional[dict] = None) -> int:
    """Run ``command`` as ranks 0..nproc-1 and return the combined exit code (see :func:`combined_exit_code`)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {nproc})")
    port = port or free_port()
    procs = [subprocess.Popen(list(command), env=rank_environment(r, nproc, port, env)) for r in range(nproc)]

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c is not None and c not in (0, REQUEUE_EXIT_CODE)]
            if failed:  # peers of a dead rank would wait in a collective until the timeout
                _stop(procs, grace_s)
                return failed[0]
            if all(c is not None for c in codes):
                return combined_exit_code(codes)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if any(p.poll() is None for p in procs):  # KeyboardInterrupt or another error in the launcher
            _stop(procs, grace_s)


def edlm_command(subcommand: str, config: str, out: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "edlm_dist.cli", subcommand, config, "--out", out, *overrides]


def _validate(config: str, overrides: Sequence[str], nproc: int) -> None:
    """Fail before spawning: bad keys, TP not dividing N, batch not divisible by the DP degree."""
    from edlm_dist.config.load import load_config, validate_world

    cfg = load_config(config, overrides)
    validate_world(cfg, nproc)


def default_nproc() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    except ImportError:
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="launchers/local.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2")
    parser.add_argument("--out", required=True, help="run folder (resumes from it if it holds a checkpoint)")
    parser.add_argument("--nproc", type=int, default=None, help="processes on this node (default: GPUs, or 1)")
    parser.add_argument("--command", default="train", choices=["train", "sample", "eval"],
                        help="the edlm subcommand every rank runs (default: train)")
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = [*args.overrides, *extra]
    nproc = args.nproc or default_nproc()
    try:
        _validate(args.config, overrides, nproc)
        code = launch(edlm_command(args.command, args.config, args.out, overrides), nproc)
    except EdlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if code == REQUEUE_EXIT_CODE:
        print(f"launchers/local.py: the run was stopped with a checkpoint; rerun the same command to resume from "
              f"{args.out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
