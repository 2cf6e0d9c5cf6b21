"""Shared pieces of the `slurm` tests: the cluster check, tiny runs, and watching a job from outside (and
the tiny synthetic data set that the local launcher's tests use too).

The tests submit through ``launchers/slurm.py`` to a real Slurm cluster: the two-node one of
``scripts/local_slurm.sh start`` (what ``.ci/run`` starts), or any cluster whose ``sinfo`` shows at
least two usable nodes with 2 CPUs each. Without one they skip and say how to get one; with
``EDLM_REQUIRE_SLURM=1`` (set by ``.ci/run``) they fail instead, so CI cannot skip them silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "demo.yaml")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from launchers import slurm  # noqa: E402

JOB_TIMEOUT_S = 240  # no test waits on a job without a limit (a job that dies before writing a result)
STEPS = 120  # ~20-50 ms each: a window of several seconds for a signal to land mid-run
SAVE_EVERY = 10


def cluster_problem() -> Optional[str]:
    """Why the slurm tests cannot run here, or None."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        return "no Slurm client on PATH"
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if done.returncode != 0:
        return f"sinfo failed: {done.stderr.strip()}"
    usable = {line.split()[0] for line in done.stdout.splitlines()
              if len(line.split()) == 3 and int(line.split()[1]) >= 2 and line.split()[2].rstrip("*") in
              ("idle", "mix", "alloc")}
    if len(usable) < 2:
        return f"the cluster has fewer than 2 usable nodes with 2 CPUs (sinfo: {done.stdout.strip()!r})"
    return None


def require_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    message = (f"no Slurm cluster to submit to ({problem}); start the local one with `scripts/local_slurm.sh start` "
               "(root and apt-get needed; .ci/run does this)")
    if os.environ.get("EDLM_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def prepare(out: Path, rows: int = 1200) -> Path:
    from edlm_dist.config.schema import SyntheticConfig
    from edlm_dist.data.prepare import prepare_data

    prepare_data("synthetic", out, seq_len=32, tokenizer_spec="synthetic",
                 synthetic_cfg=SyntheticConfig(train_rows=rows, valid_rows=64), seed=1, progress=False)
    return out


def train_overrides(data_dir, **extra) -> list[str]:
    """A tiny DP=2 MDLM run (dropout on: the noise and dropout streams must resume exactly too)."""
    base = {"data.dir": str(data_dir), "data.seq_len": 32, "model.hidden_size": 32, "model.n_blocks": 2,
            "model.n_heads": 4, "model.cond_dim": 16, "model.dropout": 0.1, "train.global_batch": 16,
            "train.micro_batch": 8, "train.steps": STEPS, "train.log_every": 1, "train.val_every": 1000,
            "train.save_every": SAVE_EVERY, "train.ema": 0.9, "train.precision": "fp32", "logging.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def on_cluster(nodes: int = 2, tasks_per_node: int = 1, cpus: int = 2, **extra) -> list[str]:
    """CPU nodes; time_min >= 60, else submitit takes any USR2 for a time-out (it allows min(0.8 T, T - 10 min))."""
    base = {"slurm.nodes": nodes, "slurm.gpus_per_node": 0, "slurm.tasks_per_node": tasks_per_node,
            "slurm.cpus_per_task": cpus, "slurm.time_min": 60}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def losses(out: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in metrics(out) if "loss" in row]


def restarts_logged(out: Path) -> list[tuple[int, int]]:
    """(SLURM_RESTART_COUNT, resumed_from_step) of every start of the run, in order."""
    return [(row["slurm_restart_count"], row["resumed_from_step"]) for row in metrics(out)
            if "slurm_restart_count" in row]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = JOB_TIMEOUT_S, job=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if job is not None and job.done(force_check=True):
            raise AssertionError(f"job {job.job_id} ended ({job.state}) before {what}:\n"
                                 f"{slurm.describe_failure(job)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def last_step(out: Path) -> int:
    return max((step for step, _ in losses(out)), default=0)


def outcome_and_result(path: Path) -> tuple[str, object]:
    """A task's result pickle: ("success", value) or ("error", traceback)."""
    import pickle

    return pickle.loads(path.read_bytes())


def sacct_records(job_id: str) -> list[dict[str, str]]:
    """Every record of a job, requeued runs included (``sacct --duplicates``)."""
    fields = ["JobID", "State", "ExitCode", "NodeList", "Start", "End"]
    done = subprocess.run(["sacct", "-j", str(job_id), "-X", "--duplicates", "--parsable2", "-n", "-o",
                           ",".join(fields)], capture_output=True, text=True, timeout=30, check=True)
    return [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines() if line]


def task_pid(job_id: str, rank: int) -> int:
    """PID of the python process of task ``rank`` of a running job (every node of the local cluster is this host)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (environ.get("SLURM_JOB_ID") == str(job_id) and environ.get("SLURM_PROCID") == str(rank)
                and "submitit.core._submit" in cmdline and "srun" not in cmdline.split("\0")[0]):
            return int(proc.name)
    raise AssertionError(f"no process of task {rank} of job {job_id} found")
