"""`edlm train` through launchers/slurm.py on a real two-node Slurm cluster (see slurm_helpers.py).

One uninterrupted DP=2 run under launchers/local.py is the reference for all of them: the SLURM job
on 2 nodes x 1 task equals it bit for bit; runs preempted with USR2 (submitit's requeue), requeued by
`scontrol requeue`, or whose rank 1 is killed and which are then submitted again, log the reference's
loss at every step and end with its weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from slurm_helpers import (CONFIG, REPO, SAVE_EVERY, STEPS, last_step, losses, on_cluster, outcome_and_result, prepare,
                           require_cluster, restarts_logged, sacct_records, slurm, task_pid, train_overrides, wait_until)

from edlm_dist.parallel.runtime import first_slurm_host, job_master_port
from edlm_dist.artifacts.checkpoint import latest_checkpoint, read_meta

pytestmark = pytest.mark.slurm
WAIT_S = 240


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    require_cluster()
    return prepare(tmp_path_factory.mktemp("slurm_train_data"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The same run, uninterrupted, as 2 processes of launchers/local.py on this machine."""
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run([sys.executable, str(REPO / "launchers" / "local.py"), CONFIG, "--out", str(out),
                           "--nproc", "2", *train_overrides(data_dir)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = dict(losses(out))
    assert sorted(logged) == list(range(1, STEPS + 1))
    return {"losses": logged, "weights": out / "weights"}


def _assert_like_reference(out, reference, *, each_step_once: bool = True) -> None:
    """Every logged loss is the reference's, bit for bit; the exported weights are the reference's."""
    logged = losses(out)
    steps = [step for step, _ in logged]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    if each_step_once:
        assert steps == list(range(1, STEPS + 1)), "a step was run twice or skipped"
    for step, loss in logged:
        assert loss == reference["losses"][step], f"step {step}: {loss!r} != reference {reference['losses'][step]!r}"
    for name in ("model.safetensors", "ema.safetensors"):
        got, want = load_file(str(out / "weights" / name)), load_file(str(reference["weights"] / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def _submit(out, overrides) -> object:
    (job,) = slurm.submit(CONFIG, str(out), overrides)
    return job


def test_two_nodes_train_like_the_local_launcher(data_dir, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # Stands in for Slurm 22.05-23.02, whose srun does not take the job's --cpus-per-task: sbatch passes this
    # on, and a bare `srun` in the job then gives each task 1 CPU. The tasks get their 2 from srun's own flag.
    monkeypatch.setenv("SRUN_CPUS_PER_TASK", "1")
    assert slurm.main([CONFIG, "--out", str(out), *train_overrides(data_dir), *on_cluster(), "--wait"]) == 0
    results = [outcome_and_result(path) for path in sorted((out / "submitit").glob("*/*_result.pkl"))]
    # One task per node, each pinned to the 2 CPUs of slurm.cpus_per_task.
    assert [(outcome, r["rank"], r["node"], r["cpus"], r["restarts"], r["step"]) for outcome, r in results] == [
        ("success", 0, "n1", 2, 0, STEPS), ("success", 1, "n2", 2, 0, STEPS)]
    _assert_like_reference(out, reference)


def test_usr2_preemption_requeues_resumes_exactly_and_stops_at_max_requeues(data_dir, reference, tmp_path):
    """USR2 (what SLURM sends before a time limit) to every task: checkpoint, submitit requeues, the job
    resumes; a second USR2 at slurm.max_requeues=1 stops with a checkpoint and a clear error instead."""
    out = tmp_path / "run"
    job = _submit(out, [*train_overrides(data_dir), *on_cluster(**{"slurm.max_requeues": 1})])
    wait_until(lambda: last_step(out) >= 3, "training to start", WAIT_S, job)
    # First to the batch shell only (it passes USR2 on to the tasks through srun) ...
    subprocess.run(["scancel", "-b", "--signal=USR2", job.job_id], check=True, timeout=30)
    wait_until(lambda: len(restarts_logged(out)) == 2 and last_step(out) >= restarts_logged(out)[1][1] + 3,
               "the requeued job to resume and train", WAIT_S, job)
    first_stop = restarts_logged(out)[1][1]
    # ... then to the job's steps, where the tasks run (what --signal=USR2@T does before a time limit).
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    slurm.wait([job], timeout_s=WAIT_S)
    assert 3 <= first_stop < STEPS, "the first signal landed after training ended"
    assert restarts_logged(out) == [(0, 0), (1, first_stop)]  # SLURM_RESTART_COUNT logged at each start
    error = str(job.exception())
    assert "not requeued" in error and "SLURM_RESTART_COUNT=1 reached slurm.max_requeues=1" in error
    last = latest_checkpoint(out)
    second_stop = int(read_meta(last)["step"])
    assert first_stop < second_stop < STEPS and str(last) in error
    assert second_stop == last_step(out)  # the stop checkpoint holds the last step trained
    logged = losses(out)
    assert [s for s, _ in logged] == list(range(1, second_stop + 1))
    assert all(loss == reference["losses"][step] for step, loss in logged)
    states = [r["State"] for r in sacct_records(job.job_id)]
    assert states[0] == "REQUEUED" and states[-1] == "FAILED", states


def test_scontrol_requeue_resumes_exactly(data_dir, reference, tmp_path):
    """The scheduler requeues a running job (SIGTERM to every task, then a restart): checkpoint, resume."""
    out = tmp_path / "run"
    job = _submit(out, [*train_overrides(data_dir), *on_cluster()])
    wait_until(lambda: last_step(out) >= 3, "training to start", WAIT_S, job)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
    slurm.wait([job], timeout_s=WAIT_S)
    results = job.results()
    stop = results[0]["start_step"]
    assert 3 <= stop < STEPS and all(r["restarts"] == 1 and r["start_step"] == stop for r in results)
    # the restarted tasks met on the port of restart 1, not the first run's (whose tasks may still hold it)
    assert {r["master"].split(":")[1] for r in results} == {str(job_master_port(job.job_id, restarts=1))}
    assert job_master_port(job.job_id, restarts=1) != job_master_port(job.job_id, restarts=0)
    assert restarts_logged(out) == [(0, 0), (1, stop)]
    _assert_like_reference(out, reference)
    assert [r["State"] for r in sacct_records(job.job_id)] == ["REQUEUED", "COMPLETED"]


def test_a_dying_task_fails_the_job_naming_it_and_keeps_the_checkpoint(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    overrides = [*train_overrides(data_dir), *on_cluster()]
    job = _submit(out, overrides)
    wait_until(lambda: last_step(out) >= SAVE_EVERY + 2, "a checkpoint to be written", WAIT_S, job)
    os.kill(task_pid(job.job_id, rank=1), signal.SIGKILL)  # what the OOM killer does
    slurm.wait([job], timeout_s=WAIT_S)
    assert job.state == "FAILED"
    last = latest_checkpoint(out)
    saved = int(read_meta(last)["step"])
    assert saved % SAVE_EVERY == 0 and saved < last_step(out)
    message = slurm.describe_failure(job, out)
    assert "task 1 (rank 1 on node n2): Slurm: Killed" in message and f"last checkpoint: {last}" in message
    # The checkpoint is intact: the same command submitted again resumes from it and ends like the reference.
    again = _submit(out, overrides)
    slurm.wait([again], timeout_s=WAIT_S)
    assert again.results()[0]["start_step"] == saved
    _assert_like_reference(out, reference, each_step_once=False)


@pytest.mark.parametrize("nodelist", ["n[1-2]", "r[1-2]n[0-3]", "node[003-005,9]", "gpu-[01-02],cpu1", "a,b[1-2]",
                                      "x[9-11]"])
def test_first_slurm_host_is_what_scontrol_lists_first(nodelist):
    require_cluster()
    listed = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    assert first_slurm_host(nodelist) == listed[0]
