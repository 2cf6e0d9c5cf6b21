"""One node, N processes: ``edlm train`` (or another ``edlm`` command) on every local GPU / CPU rank.

    python launchers/local.py CONFIG --out DIR --nproc N [key=value ...]

The processes are started by ``torch.distributed.run`` (torchrun's elastic agent, ``--standalone``):
it spawns N ranks with RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
which :func:`edlm_dist.parallel.runtime.init_parallel` reads (gloo on CPU, NCCL on GPU; one GPU per
LOCAL_RANK), and stops the others when one fails. This file adds only our semantics on top. The config
is validated for N processes before anything starts.

* SIGTERM / SIGUSR1 sent to the launcher go to every rank (torchrun's ``--signals-to-handle``): the
  trainer checkpoints after the current step and the ranks exit with ``REQUEUE_EXIT_CODE`` (3), which
  the launcher returns -- rerun the same command to resume. Ranks get ``SHUTDOWN_TIMEOUT_S`` to finish
  that step and write the checkpoint before torchrun sends SIGKILL.
* A rank that fails takes the others down; the launcher returns the exit code of the rank that failed
  first (torchrun's root cause), not torchrun's own 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python launchers/local.py`: make `edlm_dist` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edlm_dist.errors import REQUEUE_EXIT_CODE, ConfigError, EdlmError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the trainer's "checkpoint and stop" signals
SHUTDOWN_TIMEOUT_S = 120  # a signalled or orphaned rank's time to finish its step and checkpoint before SIGKILL


def combined_exit_code(codes: Sequence[int]) -> int:
    """0 if every rank succeeded; a real failure wins over a preemption (3), which wins over success."""
    failures = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    if failures:
        return failures[0]
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0


def torchrun_arguments(command: Sequence[str], nproc: int, *, shutdown_timeout_s: int) -> list[str]:
    """``torch.distributed.run`` arguments that run ``command`` (an executable and its arguments) N times."""
    signals = ",".join(["SIGINT", *(signal.Signals(s).name for s in FORWARDED_SIGNALS)])
    return ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", f"--signals-to-handle={signals}",
            f"--shutdown-timeout={shutdown_timeout_s}", "--no-python", *command]


def launch(command: Sequence[str], nproc: int, *, shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> int:
    """Run ``command`` as ranks 0..nproc-1 under torchrun's agent; return our exit code (module docstring)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {nproc})")
    # N ranks share the node's cores; without this each would start one thread per core (torchrun: 1).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(torchrun_arguments(command, nproc, shutdown_timeout_s=shutdown_timeout_s))
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", f"edlm-local-{os.getpid()}"
    config, entrypoint, entry_args = config_from_args(args)
    try:
        elastic_launch(config=config, entrypoint=entrypoint)(*entry_args)
        return 0
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        codes = [first.exitcode] + [f.exitcode for f in err.failures.values() if f is not first]
        return combined_exit_code(codes)
    except SignalException as err:  # the ranks got the signal too: they checkpointed and stopped
        return REQUEUE_EXIT_CODE if err.sigval in FORWARDED_SIGNALS else 128 + int(err.sigval)


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
