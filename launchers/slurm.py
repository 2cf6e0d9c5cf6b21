"""Submit ``edlm train`` (or ``sample`` / ``eval``) to SLURM with submitit: N nodes x G tasks, preemption-safe.

    python launchers/slurm.py CONFIG --out DIR [key=value ...] [--command train|sample|eval]
                              [--sweep key=v1,v2 ...] [--wait] [--dry-run]

Layout: ``slurm.nodes`` nodes, ``slurm.gpus_per_node`` tasks per node (one process per GPU; on CPU
nodes ``slurm.gpus_per_node=0 slurm.tasks_per_node=N``). Every task is started by ``srun`` with the
job's ``--cpus-per-task`` (Slurm 22.05-23.02 do not pass it on by themselves), ``--kill-on-bad-exit``
(a task that dies takes the step down instead of leaving its peers blocked in a collective) and, with
GPUs, ``--gpu-bind=none`` (every task sees the node's GPUs and ``LOCAL_RANK`` picks one, which is what
DeepSpeed's ``set_device(LOCAL_RANK)`` assumes). Each task runs a job of ``launchers/slurm_tasks.py``.

Preemption and time limits (``train``). The sbatch file asks SLURM for ``--signal=USR2@<delay>`` and
``--requeue``. submitit's own USR2 handler would requeue from global rank 0 in the middle of an
optimizer step while the other ranks carry on, and save nothing. :class:`TrainJob` routes USR2 (and
SIGTERM/SIGUSR1) to the trainer instead: all ranks agree (all-reduce) to stop after the current step,
write a checkpoint of that step together, and only then rank 0 runs submitit's requeue path
(``checkpoint()`` -> pickle -> ``scontrol requeue``). The requeued job resumes from
``OUT/checkpoints/latest``. SIGTERM/SIGUSR1 (``scontrol requeue``, ``scancel``, preemption without a
user signal) also checkpoint; the job then exits with ``REQUEUE_EXIT_CODE`` and the scheduler requeues
or ends it. ``slurm.max_requeues`` caps ``SLURM_RESTART_COUNT``: at the cap a signalled run stops with
its checkpoint instead of requeueing, and a run restarted beyond it refuses to start; both fail with an
``error`` naming the checkpoint (submit the same command again to continue).

Sweeps: ``--sweep train.lr=1e-4,3e-4`` makes a job array with one task per value (several
``--sweep`` flags: every combination); task i writes into ``DIR/<key>=<value>...``.
``--wait`` stays until the jobs end and explains a failure: which task (rank, node) died and how,
and the last checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python launchers/slurm.py`: make `edlm_dist` and `launchers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import submitit

from edlm_dist.config.load import config_to_dict, load_config, validate_world
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import ConfigError, EdlmError
from launchers import slurm_tasks
from launchers.slurm_tasks import TASK_LINE_PATTERN, CommandJob, TrainJob

SIGNAL_DELAY_S = 180  # USR2 this long before the time limit: one step + a checkpoint must fit
SUBMITIT_DIR = "submitit"  # under --out: pickles and per-task logs (%j_%t_log.out/err)
COMMANDS = ("train", "sample", "eval")


# ----------------------------------------------------------------------------- executor parameters
# sbatch lines before the srun line. The batch shell passes USR2 on to srun, which passes it to every task:
# `scancel -b --signal=USR2` and `--signal=B:USR2@T` signal only the batch shell, which would otherwise die of
# it (no checkpoint) or, with a plain trap, run the trap only after srun has returned. So srun runs in the
# background and the shell waits for it, and still returns its exit status.
FORWARD_USR2_TO_TASKS = [
    "trap 'kill -USR2 \"$EDLM_SRUN_PID\" 2>/dev/null' USR2",
    'srun() { command srun "$@" & EDLM_SRUN_PID=$!; while kill -0 "$EDLM_SRUN_PID" 2>/dev/null; do '
    'wait "$EDLM_SRUN_PID"; done; wait "$EDLM_SRUN_PID"; }',
]
def srun_arguments(cfg: RunConfig) -> list[str]:
    """What every task's ``srun`` needs beyond submitit's defaults (see the module docstring)."""
    args = [f"--cpus-per-task={cfg.slurm.cpus_per_task}", "--kill-on-bad-exit=1"]
    if cfg.slurm.gpus_per_node > 0:
        args.append("--gpu-bind=none")
    return args


def executor_parameters(cfg: RunConfig, *, job_name: str = "edlm", signal_delay_s: int = SIGNAL_DELAY_S) -> dict:
    """``AutoExecutor.update_parameters`` kwargs: shared names plus ``slurm_`` ones from ``cfg.slurm``."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": job_name, "timeout_min": int(s.time_min), "nodes": int(s.nodes), "tasks_per_node": int(s.tasks),
        "cpus_per_task": int(s.cpus_per_task), "slurm_signal_delay_s": int(signal_delay_s),
        "slurm_srun_args": srun_arguments(cfg), "slurm_setup": list(FORWARD_USR2_TO_TASKS),
        "slurm_additional_parameters": {"requeue": True},  # allow `scontrol requeue` on any cluster default
    }
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = int(s.gpus_per_node)
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


def build_executor(cfg: RunConfig, folder: str | os.PathLike, **kwargs: Any) -> submitit.AutoExecutor:
    """``AutoExecutor(cluster="slurm")`` for ``cfg.slurm``."""
    if shutil.which("srun") is None:
        raise ConfigError("srun is not on PATH: submit from a SLURM login node, start the local test cluster "
                          "(scripts/local_slurm.sh start), or use --dry-run to see the sbatch file")
    # submitit counts time-outs against this; TrainJob caps every restart (SLURM_RESTART_COUNT) at the same number.
    executor = submitit.AutoExecutor(folder=str(Path(folder).resolve() / "%j"), cluster="slurm",
                                     slurm_max_num_timeout=int(cfg.slurm.max_requeues))
    executor.update_parameters(**executor_parameters(cfg, **kwargs))
    return executor


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


def _check_command_inputs(command: str, cfg: RunConfig) -> None:
    """What `edlm sample` / `edlm eval` check before loading a model, now, before anything is queued."""
    if command == "sample":
        from edlm_dist.sampling.run import check_inputs

        check_inputs(cfg)
    elif command == "eval":
        from edlm_dist.evaluation.run import resolve_plan

        resolve_plan(cfg)


def plan_jobs(config_path: str, out: str, overrides: Sequence[str] = (), sweeps: Sequence[str] = (),
              command: str = "train") -> list[tuple[RunConfig, list[str], Path]]:
    """Validated ``(config, overrides, out folder)`` per job (array task); nothing is submitted."""
    if command not in COMMANDS:
        raise ConfigError(f"--command {command} is not one of {', '.join(COMMANDS)}")
    plan = []
    for point in parse_sweeps(sweeps):
        cfg = _absolute_paths(load_config(config_path, [*overrides, *point]))
        if command == "train" and not cfg.data.dir:
            raise ConfigError("data.dir is empty; run `edlm prepare-data ... --out DATA` and pass data.dir=DATA")
        validate_world(cfg, cfg.slurm.nodes * cfg.slurm.tasks, training=command == "train")
        _check_command_inputs(command, cfg)
        folder = Path(out).resolve() / sweep_folder(point) if sweeps else Path(out).resolve()
        plan.append((cfg, [*overrides, *point], folder))
    return plan


def submit(config_path: str, out: str, overrides: Sequence[str] = (), sweeps: Sequence[str] = (), *,
           command: str = "train", **executor_kwargs: Any) -> list:
    """Submit one job (or one array) and return the submitit jobs."""
    import cloudpickle

    plan = plan_jobs(config_path, out, overrides, sweeps, command)
    # Pickle the jobs by value: the tasks then need `edlm_dist` only, not this checkout on their sys.path.
    cloudpickle.register_pickle_by_value(slurm_tasks)
    executor = build_executor(plan[0][0], Path(out) / SUBMITIT_DIR, **executor_kwargs)
    config = str(Path(config_path).resolve())
    jobs_to_submit = [TrainJob(config_to_dict(cfg), str(folder)) if command == "train"
                      else CommandJob(command, config, str(folder), point_overrides)
                      for cfg, point_overrides, folder in plan]
    if len(jobs_to_submit) == 1:
        return [executor.submit(jobs_to_submit[0])]
    with executor.batch():  # one SLURM job array, one task per sweep point
        jobs = [executor.submit(job) for job in jobs_to_submit]
    return jobs


# ----------------------------------------------------------------------------- waiting and failures
def wait(jobs: Sequence, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> None:
    """Until SLURM says every job has ended (``sacct`` at each poll: the tasks' result files can appear while
    srun still winds the step down); TimeoutError after ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def ended(job) -> bool:  # without accounting sacct knows nothing (UNKNOWN): then the result files decide
        return job.watcher.is_done(job.job_id, mode="force") or (job.state == "UNKNOWN" and job.done())

    while not all(ended(job) for job in jobs):
        if deadline is not None and time.monotonic() > deadline:
            states = ", ".join(f"{job.job_id}: {job.state}" for job in jobs)
            raise TimeoutError(f"SLURM jobs still running after {timeout_s:.0f} s ({states})")
        time.sleep(poll_s)


_SRUN_ERROR = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)")  # Slurm's words


def _expand_tasks(spec: str) -> list[int]:
    """srun's task lists: ``1``, ``0-3``, ``0,2-3``."""
    tasks = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        tasks.extend(range(int(low), int(high or low) + 1))
    return tasks


def task_reports(job) -> dict[int, dict[str, str]]:
    """Per task of an ended job: its node, what Slurm said about it and its own error, from the job folder."""
    folder = Path(job.paths.folder)
    reports: dict[int, dict[str, str]] = {}
    for log in sorted(folder.glob("*_log.out")):
        for match in TASK_LINE_PATTERN.finditer(log.read_text(errors="replace")):
            reports.setdefault(int(match["rank"]), {})["node"] = match["node"]
    for log in sorted(folder.glob("*_log.err")):
        for match in _SRUN_ERROR.finditer(log.read_text(errors="replace")):
            for task in _expand_tasks(match["tasks"]):
                reports.setdefault(task, {}).update(node=match["node"], slurm=match["what"].strip())
    for result in sorted(folder.glob("*_result.pkl")):
        task = int(result.name.split("_")[-2])
        try:
            outcome, value = pickle.loads(result.read_bytes())
        except Exception:  # noqa: BLE001 - a half-written pickle is no reason to hide the rest
            continue
        if outcome == "error":
            last = [x for x in str(value).strip().splitlines() if x.strip()][-1:]
            reports.setdefault(task, {})["error"] = last[0].strip() if last else "failed"
    return reports


def describe_failure(job, out: Optional[str | os.PathLike] = None) -> str:
    """One paragraph for an ended job that failed: each task that failed (rank, node, how) and the last checkpoint."""
    parts = [f"SLURM job {job.job_id} ended as {job.state}"]
    reports = task_reports(job)
    # Tasks that died without an error of their own (killed) first: their peers' errors are the consequence.
    for task, report in sorted(reports.items(), key=lambda item: ("error" in item[1], item[0])):
        how = "; ".join(x for x in (report.get("slurm") and f"Slurm: {report['slurm']}", report.get("error")) if x)
        if how:
            parts.append(f"task {task} (rank {task} on node {report.get('node', '?')}): {how}")
    if out is not None:
        from edlm_dist.artifacts.checkpoint import latest_checkpoint

        last = latest_checkpoint(out)
        parts.append(f"last checkpoint: {last if last else 'none'}"
                     + (" (submit the same command again to resume from it)" if last else ""))
    parts.append(f"logs: {job.paths.folder}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/slurm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config (its slurm: section sets nodes, GPUs, partition, time...)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. slurm.nodes=4 train.steps=1000")
    p.add_argument("--out", required=True, help="run folder (shared file system); a requeued job resumes from it")
    p.add_argument("--command", default="train", choices=COMMANDS, help="the edlm subcommand every task runs")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="job array: one task per value (repeat for a grid); task outputs in OUT/KEY=V")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch file and the plan; submit nothing")
    p.add_argument("--wait", action="store_true", help="stay until the jobs end; explain a failure (exit 1)")
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
            plan = plan_jobs(args.config, args.out, overrides, args.sweep, args.command)
            array = len(plan) if args.sweep else None
            print(sbatch_text(plan[0][0], Path(args.out) / SUBMITIT_DIR, array_size=array, **kwargs))
            for i, (_, _, folder) in enumerate(plan):
                print(f"# task {i}: --out {folder}")
            return 0
        jobs = submit(args.config, args.out, overrides, args.sweep, command=args.command, **kwargs)
    except EdlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for job in jobs:
        print(f"submitted job {job.job_id}; logs: {job.paths.stdout}", flush=True)
    if not args.wait:
        return 0
    wait(jobs)
    failed = [job for job in jobs if job.exception() is not None]
    for job in failed:
        out = job.submission().function.out if args.command == "train" else None
        print(f"error: {describe_failure(job, out)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
