"""What every task of a SLURM job runs (``python -m submitit.core._submit`` loads one of these and calls it).

* :class:`TrainJob` - ``edlm train``, preemption-safe and resumable (see ``launchers/slurm.py``).
* :class:`CommandJob` - ``edlm sample`` / ``edlm eval`` on all the job's tasks (proposals or rows are
  spread over them); not resumable, a requeued one simply runs again (the results are deterministic).

Both start with :func:`task_environment`, which turns the SLURM task layout into the torchrun variables
that :func:`edlm_dist.parallel.runtime.init_parallel` and DeepSpeed read, and print one line naming the
task, its rank and its node, so that a failure can be traced to a node (``launchers/slurm.py`` reads it
back). This module is pickled by value with the job: the tasks need ``edlm_dist`` only.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any

import submitit

from edlm_dist.errors import EdlmError

TASK_LINE = "edlm task: rank {rank} of {world} on node {node} (local rank {local}), SLURM job {job}, " \
            "SLURM_RESTART_COUNT={restarts}, {cpus} CPUs, master {master}"
TASK_LINE_PATTERN = re.compile(r"edlm task: rank (?P<rank>\d+) of \d+ on node (?P<node>\S+)")  # reads it back


class RequeueLimit(EdlmError):
    """The run has been restarted ``slurm.max_requeues`` times: it stops (with its checkpoint) instead."""


@dataclass
class TaskInfo:
    rank: int
    world: int
    local_rank: int
    node: str
    job_id: str
    restarts: int  # SLURM_RESTART_COUNT: how often the scheduler has restarted this job
    cpus: int  # CPUs this task may run on (what srun's --cpus-per-task gave it)
    master: str  # MASTER_ADDR:MASTER_PORT, where rank 0 listens for the rendezvous


def task_environment() -> TaskInfo:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT for this task; log it."""
    from edlm_dist.parallel.runtime import job_master_port

    # sbatch exports the submitting shell's environment: a MASTER_PORT set there would be shared by every job
    # and array task on a node. submitit's own choice (20000-60000 from the job id) can fall on a port the
    # node already uses for outgoing connections; ours stays below the ephemeral range and moves on requeue.
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    os.environ["MASTER_PORT"] = str(job_master_port(os.environ.get("SLURM_JOB_ID", "0"), restarts))
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    # One process per GPU, all GPUs of the node visible (srun --gpu-bind=none): LOCAL_RANK picks the device.
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Torch's CPU threads: the CPUs SLURM gave this task, unless the user chose (OMP_NUM_THREADS set).
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", str(cpus)))
    info = TaskInfo(rank=dist_env.rank, world=dist_env.world_size, local_rank=dist_env.local_rank,
                    node=os.environ.get("SLURMD_NODENAME") or os.uname().nodename,
                    job_id=os.environ.get("SLURM_JOB_ID", "?"),
                    restarts=restarts, cpus=cpus, master=f"{dist_env.master_addr}:{dist_env.master_port}")
    print(TASK_LINE.format(rank=info.rank, world=info.world, node=info.node, local=info.local_rank, job=info.job_id,
                           restarts=info.restarts, cpus=info.cpus, master=info.master), flush=True)
    return info


def _result(info: TaskInfo, **extra: Any) -> dict:
    return {"rank": info.rank, "node": info.node, "restarts": info.restarts, "cpus": info.cpus, "master": info.master,
            **extra}


# ----------------------------------------------------------------------------- training
class TrainJob(submitit.helpers.Checkpointable):
    """One training run (all tasks of a SLURM job run it); resumable, so checkpoint() just resubmits it."""

    def __init__(self, config: dict, out: str, requeues: int = 0):
        self.config, self.out, self.requeues = config, str(out), int(requeues)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before requeueing: the same run again; the training state is in OUT/checkpoints."""
        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.out, self.requeues + 1))

    def _limit(self, info: TaskInfo, max_requeues: int, what: str) -> RequeueLimit:
        from edlm_dist.artifacts import checkpoint as ckpt

        last = ckpt.latest_checkpoint(self.out)
        return RequeueLimit(f"{what}: SLURM_RESTART_COUNT={info.restarts} reached slurm.max_requeues={max_requeues}; "
                            f"last checkpoint: {last if last else 'none'}; submit the same command again to continue "
                            "from it (or raise slurm.max_requeues)")

    def __call__(self) -> dict:
        from submitit.core.job_environment import JobEnvironment, SignalHandler
        from submitit.core.utils import DelayedSubmission

        from edlm_dist.config.load import config_from_dict
        from edlm_dist.parallel.runtime import shutdown_parallel
        from edlm_dist.artifacts import checkpoint as ckpt
        from edlm_dist.errors import REQUEUE_EXIT_CODE
        from edlm_dist.training.trainer import PREEMPTION_SIGNALS, Preempted, Trainer

        info = task_environment()
        cfg = config_from_dict(self.config)
        if info.restarts > cfg.slurm.max_requeues:  # requeued by the scheduler once too often: do not train
            raise self._limit(info, cfg.slurm.max_requeues, "not resuming")
        env = JobEnvironment()
        requeue_signal = env._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        # submitit's requeue logic, started now so its time-out accounting sees the job's run time.
        requeuer = SignalHandler(env, env.paths, DelayedSubmission.load(env.paths.submitted_pickle))
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
            trainer.metrics.log({"slurm_job_id": info.job_id, "slurm_restart_count": info.restarts,
                                 "resumed_from_step": start_step}, start_step, console=False)
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
            return _result(info, start_step=start_step, step=trainer.step, requeues=self.requeues, out=self.out)
        print(f"edlm TrainJob: {stopped}", flush=True)
        if stopped.signum != requeue_signal:  # SIGTERM/SIGUSR1: the scheduler requeues (or cancels) the job itself
            _leave(REQUEUE_EXIT_CODE)
        if info.restarts >= cfg.slurm.max_requeues:  # every task raises: each leaves an error result
            raise self._limit(info, cfg.slurm.max_requeues, f"not requeued after {stopped}")
        try:  # global rank 0: checkpoint() -> pickle -> requeue -> exit; other ranks return at once
            requeuer.checkpoint_and_try_requeue(stopped.signum)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        _leave(code)


def _leave(code: int) -> None:
    """Exit without a result pickle (the requeued job writes it) and without interpreter teardown.

    The teardown is where torch 2.13 + gloo sometimes aborts (STACK_NOTES); an abort would replace
    submitit's requeue exit status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- sampling and evaluation
class CommandJob:
    """``edlm sample`` or ``edlm eval`` on every task; the command spreads its work over the ranks."""

    def __init__(self, command: str, config: str, out: str, overrides: list[str]):
        self.command, self.config, self.out, self.overrides = command, config, str(out), list(overrides)

    def __call__(self) -> dict:
        from edlm_dist.cli import main

        info = task_environment()
        code = main([self.command, self.config, "--out", self.out, *self.overrides])
        if code != 0:
            raise EdlmError(f"edlm {self.command} exited with status {code} on rank {info.rank} (node {info.node}); "
                            "its log says why")
        return _result(info, command=self.command, out=self.out)
