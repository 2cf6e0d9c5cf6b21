"""Submit ``edlm train`` to SLURM with submitit: N nodes x G GPUs, one task per GPU, preemption-safe.

    python launchers/slurm.py CONFIG --out DIR [key=value ...] [--sweep key=v1,v2 ...] [--dry-run]

Layout: ``slurm.nodes`` nodes, ``slurm.gpus_per_node`` tasks per node (one process per GPU), each
task runs :class:`TrainJob` under ``srun``; ``TorchDistributedEnvironment().export()`` turns the
SLURM task layout into RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK and
:func:`edlm_dist.parallel.runtime.init_parallel` builds torch.distributed + Megatron from them.
Partition, account, qos, constraint, memory and time come from the ``slurm:`` config section.

Preemption and time limits. The sbatch file asks SLURM for ``--signal=USR2@<delay>`` (and
``--requeue``). submitit installs its own handlers in every task: USR2 -> (global rank 0 only)
call ``checkpoint()`` of the submitted callable, pickle what it returns, ``scontrol requeue``,
exit; SIGTERM -> ignored. Calling that straight from the signal handler would requeue in the
middle of an optimizer step on rank 0 while the other ranks keep training, and would save
nothing. So :class:`TrainJob` re-routes USR2 (and SIGTERM/SIGUSR1) to the trainer's flag: all
ranks agree (all-reduce) to stop after the current step, write a checkpoint of that step
together, and only then rank 0 runs submitit's own requeue path
(``SignalHandler.checkpoint_and_try_requeue``: ``checkpoint()`` -> pickle -> requeue, timeouts
counted against ``slurm.max_requeues``). The requeued job starts the same :class:`TrainJob`,
which resumes from ``OUT/checkpoints/latest`` on its own. SIGTERM/SIGUSR1 (``scancel``, SLURM
preemption without a user signal) checkpoint and exit with ``REQUEUE_EXIT_CODE`` without requeueing
(SLURM's ``PreemptMode=REQUEUE`` or a resubmission of the same command resumes).

Sweeps: ``--sweep train.lr=1e-4,3e-4`` makes a job array with one task per value (several
``--sweep`` flags: every combination); task i trains into ``DIR/<key>=<value>...``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python launchers/slurm.py`: make `edlm_dist` and `launchers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import submitit

from edlm_dist.config.load import config_from_dict, config_to_dict, load_config, validate_world
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import ConfigError, EdlmError

SIGNAL_DELAY_S = 180  # USR2 this long before the time limit: one step + a checkpoint must fit
SUBMITIT_DIR = "submitit"  # under --out: pickles and per-task logs (%j_%t_log.out/err)


# ----------------------------------------------------------------------------- executor parameters
def executor_parameters(cfg: RunConfig, *, job_name: str = "edlm", signal_delay_s: int = SIGNAL_DELAY_S,
                        gpus: bool = True) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` kwargs: shared names plus ``slurm_`` ones from ``cfg.slurm``."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": job_name, "timeout_min": int(s.time_min), "nodes": int(s.nodes),
        "tasks_per_node": int(s.gpus_per_node),  # one process per GPU
        "gpus_per_node": int(s.gpus_per_node) if gpus else 0, "cpus_per_task": int(s.cpus_per_task),
        "slurm_signal_delay_s": int(signal_delay_s),
        "slurm_additional_parameters": {"requeue": True},  # allow `scontrol requeue` on any cluster default
    }
    if s.mem_gb > 0:
        params["mem_gb"] = int(s.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    return params


def sbatch_parameters(cfg: RunConfig, **kwargs: Any) -> dict[str, Any]:
    """The same request in sbatch names (what ``AutoExecutor(cluster="slurm")`` hands to ``_make_sbatch_string``)."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem

    rename = SlurmExecutor._equivalence_dict()
    out: dict[str, Any] = {}
    for key, value in executor_parameters(cfg, **kwargs).items():
        if key.startswith("slurm_"):
            out[key[len("slurm_"):]] = value
        else:
            out[rename.get(key, key)] = value
    if "mem" in out:
        out["mem"] = _convert_mem(out["mem"])
    return out


def submitit_command(folder: str | os.PathLike, python: Optional[str] = None) -> str:
    """What every task runs (``SlurmExecutor._submitit_command_str``): load the job pickle and call it."""
    return " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_text(cfg: RunConfig, folder: str | os.PathLike, *, array_size: Optional[int] = None, **kwargs: Any) -> str:
    """The sbatch file submitit would submit, built without SLURM (``--dry-run`` and tests)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).resolve() / "%j"  # as build_executor: submitit replaces %j with the job id
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, map_count=array_size,
                               **sbatch_parameters(cfg, **kwargs))


def build_executor(cfg: RunConfig, folder: str | os.PathLike, *, cluster: Optional[str] = None,
                   **kwargs: Any) -> submitit.AutoExecutor:
    """``AutoExecutor`` for ``cfg.slurm`` (``cluster``: None = detect, "slurm", "local", "debug")."""
    if cluster == "slurm" and shutil.which("srun") is None:
        raise ConfigError("srun is not on PATH: submit from a SLURM login node (or use --dry-run to see the "
                          "sbatch file, --cluster local to run the job on this machine)")
    requeues = int(cfg.slurm.max_requeues)  # submitit counts time-outs only; preemptions requeue freely
    executor = submitit.AutoExecutor(folder=str(Path(folder).resolve() / "%j"), cluster=cluster,
                                     slurm_max_num_timeout=requeues, local_max_num_timeout=requeues)
    on_cluster = executor.cluster == "slurm"
    gpus = on_cluster or _visible_gpus() >= cfg.slurm.gpus_per_node
    executor.update_parameters(**executor_parameters(cfg, gpus=gpus, **kwargs))
    return executor


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------- the job
class TrainJob(submitit.helpers.Checkpointable):
    """One training run (all tasks of a SLURM job run it); resumable, so checkpoint() just resubmits it."""

    def __init__(self, config: dict, out: str, requeues: int = 0):
        self.config, self.out, self.requeues = config, str(out), int(requeues)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before requeueing: the same run again; the training state is in OUT/checkpoints."""
        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.out, self.requeues + 1))

    def __call__(self) -> dict:
        from submitit.core.job_environment import JobEnvironment, SignalHandler
        from submitit.core.utils import DelayedSubmission

        from edlm_dist.parallel.runtime import shutdown_parallel
        from edlm_dist.artifacts import checkpoint as ckpt
        from edlm_dist.errors import REQUEUE_EXIT_CODE
        from edlm_dist.training.trainer import PREEMPTION_SIGNALS, Preempted, Trainer

        # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; GPUs stay visible: init_parallel picks LOCAL_RANK's device.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        env = JobEnvironment()
        requeue_signal = env._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        # submitit's requeue logic, started now so its time-out accounting sees the job's run time.
        requeuer = SignalHandler(env, env.paths, DelayedSubmission.load(env.paths.submitted_pickle))
        cfg = config_from_dict(self.config)
        latest = ckpt.latest_checkpoint(self.out)
        start_step = int(ckpt.read_meta(latest)["step"]) if latest is not None else 0
        # Until the trainer exists, only remember stop signals (submitit's handler would requeue from rank 0
        # alone while the other ranks carry on); they are re-raised once the trainer can act on them.
        pending: list[int] = []
        for sig in (requeue_signal, *PREEMPTION_SIGNALS):
            signal.signal(sig, lambda signum, _frame: pending.append(signum))
        trainer, stopped = None, None
        try:
            trainer = Trainer(cfg, self.out)
            trainer.install_signal_handlers()  # SIGTERM/SIGUSR1 -> stop after this step with a checkpoint
            signal.signal(requeue_signal, signal.getsignal(signal.SIGTERM))  # and submitit's USR2 too
            for signum in pending:
                signal.raise_signal(signum)
            trainer.train()
        except Preempted as exc:
            stopped = exc
        finally:
            if trainer is not None:
                trainer.close()
            shutdown_parallel()
        if stopped is None:
            return {"rank": env.global_rank, "start_step": start_step, "step": trainer.step,
                    "requeues": self.requeues, "out": self.out}
        print(f"edlm TrainJob: {stopped}", flush=True)
        if stopped.signum == requeue_signal:
            try:  # global rank 0: checkpoint() -> pickle -> requeue -> exit; other ranks return at once
                requeuer.checkpoint_and_try_requeue(stopped.signum)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
        else:
            code = REQUEUE_EXIT_CODE
        _leave(code)


def _leave(code: int) -> None:
    """Exit without a result pickle (the requeued job writes it) and without interpreter teardown.

    The teardown is where torch 2.13 + gloo sometimes aborts (STACK_NOTES); an abort would replace
    submitit's requeue exit code and the local executor would not restart the job.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- sweeps and submission
def parse_sweeps(specs: Sequence[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> ``[["a=1", "b=x"], ["a=1", "b=y"], ...]``; ``[]`` -> ``[[]]``."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v for v in values.split(",") if v != ""]
        if not sep or not key or not items:
            raise ConfigError(f"--sweep '{spec}' must look like key=v1,v2 (e.g. --sweep train.lr=1e-4,3e-4)")
        axes.append([f"{key}={v}" for v in items])
    return [list(combo) for combo in itertools.product(*axes)]


def sweep_folder(overrides: Sequence[str]) -> str:
    """Sub-folder name of one sweep point: ``train.lr=1e-4_train.seed=2``."""
    return "_".join(overrides).replace("/", "-") or "run"


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Tasks may start in another directory: pin every path of the config."""
    if cfg.data.dir:
        cfg.data.dir = str(Path(cfg.data.dir).resolve())
    if cfg.train.diffusion_ckpt:
        cfg.train.diffusion_ckpt = str(Path(cfg.train.diffusion_ckpt).resolve())
    return cfg


def plan_jobs(config_path: str, out: str, overrides: Sequence[str] = (),
              sweeps: Sequence[str] = ()) -> list[tuple[RunConfig, Path]]:
    """Validated ``(config, out folder)`` per job (array task); nothing is submitted."""
    points = parse_sweeps(sweeps)
    plan = []
    for point in points:
        cfg = _absolute_paths(load_config(config_path, [*overrides, *point]))
        if not cfg.data.dir:
            raise ConfigError("data.dir is empty; run `edlm prepare-data ... --out DATA` and pass data.dir=DATA")
        validate_world(cfg, cfg.slurm.nodes * cfg.slurm.gpus_per_node)
        folder = Path(out).resolve() / sweep_folder(point) if sweeps else Path(out).resolve()
        plan.append((cfg, folder))
    return plan


def submit(config_path: str, out: str, overrides: Sequence[str] = (), sweeps: Sequence[str] = (), *,
           cluster: Optional[str] = None, **executor_kwargs: Any) -> list:
    """Submit one job (or one array) and return the submitit jobs."""
    import cloudpickle

    plan = plan_jobs(config_path, out, overrides, sweeps)
    # Pickle TrainJob by value: the tasks then need `edlm_dist` only, not this file on their sys.path.
    cloudpickle.register_pickle_by_value(sys.modules[TrainJob.__module__])
    executor = build_executor(plan[0][0], Path(out) / SUBMITIT_DIR, cluster=cluster, **executor_kwargs)
    jobs_to_submit = [TrainJob(config_to_dict(cfg), str(folder)) for cfg, folder in plan]
    if len(jobs_to_submit) == 1:
        return [executor.submit(jobs_to_submit[0])]
    with executor.batch():  # one SLURM job array, one task per sweep point
        jobs = [executor.submit(job) for job in jobs_to_submit]
    return jobs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/slurm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config (its slurm: section sets nodes, GPUs, partition, time...)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. slurm.nodes=4 train.steps=1000")
    p.add_argument("--out", required=True, help="run folder (shared file system); a requeued job resumes from it")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="job array: one task per value (repeat for a grid); task outputs in OUT/KEY=V")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch file and the plan; submit nothing")
    p.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="slurm (default), or local: the same job with submitit's local executor on this machine")
    p.add_argument("--job-name", default="edlm")
    p.add_argument("--signal-delay-s", type=int, default=SIGNAL_DELAY_S,
                   help="seconds before the time limit at which SLURM sends USR2 (checkpoint + requeue)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = [*args.overrides, *extra]
    kwargs = {"job_name": args.job_name, "signal_delay_s": args.signal_delay_s}
    try:
        if args.dry_run:
            plan = plan_jobs(args.config, args.out, overrides, args.sweep)
            array = len(plan) if args.sweep else None
            print(sbatch_text(plan[0][0], Path(args.out) / SUBMITIT_DIR, array_size=array, **kwargs))
            for i, (_, folder) in enumerate(plan):
                print(f"# task {i}: --out {folder}")
            return 0
        jobs = submit(args.config, args.out, overrides, args.sweep, cluster=args.cluster, **kwargs)
    except EdlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for job in jobs:
        print(f"submitted job {job.job_id}; logs: {job.paths.stdout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
