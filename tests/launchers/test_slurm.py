"""launchers/slurm.py: sbatch layout (no SLURM needed), job arrays, and a real 2-task submitit job
(local executor, gloo) that is preempted with submitit's USR2, requeues and resumes bit-exactly."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.errors import ConfigError
from tests.spawn import run_on_ranks

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from launchers import slurm  # noqa: E402

CONFIG = str(REPO / "configs" / "demo.yaml")
STEPS = 100  # ~20 ms each: a wide window for the signal to land mid-run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from edlm_dist.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("slurm_data")
    prepare_data("synthetic", out, seq_len=32, tokenizer_spec="synthetic",
                 synthetic_cfg=SyntheticConfig(train_rows=1200, valid_rows=64), seed=1, progress=False)
    return out


def _cluster_overrides(data_dir) -> list[str]:
    return [f"data.dir={data_dir}", "slurm.nodes=2", "slurm.gpus_per_node=8", "slurm.cpus_per_task=10",
            "slurm.partition=gpu", "slurm.account=proj42", "slurm.qos=high", "slurm.constraint=h100",
            "slurm.mem_gb=480", "slurm.time_min=1440", "slurm.max_requeues=7", "parallel.tp=2",
            "train.global_batch=64", "train.micro_batch=8"]


def _sbatch_flags(text: str) -> dict[str, str]:
    flags = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def test_sbatch_text_for_two_nodes_of_eight_gpus(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert slurm.main([CONFIG, "--out", str(out), "--dry-run", *_cluster_overrides(data_dir)]) == 0
    text = capsys.readouterr().out
    flags = _sbatch_flags(text)
    assert {k: flags[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "partition",
                                  "account", "qos", "constraint", "mem", "time", "signal")} == {
        "nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8", "cpus-per-task": "10", "partition": "gpu",
        "account": "proj42", "qos": "high", "constraint": "h100", "mem": "480GB", "time": "1440",
        "signal": f"USR2@{slurm.SIGNAL_DELAY_S}"}
    assert "requeue" in flags and "array" not in flags
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(f"-u -m submitit.core._submit {out.resolve()}/submitit/%j")
    assert not out.exists()  # a dry run writes nothing


def _stub_slurm(bin_dir: Path, record: Path) -> None:
    """`srun` (so submitit detects SLURM) and an `sbatch` that keeps the script and prints a job id."""
    bin_dir.mkdir()
    scripts = {"srun": "#!/bin/sh\nexit 0\n",
               "sbatch": (f'#!/bin/sh\nfor a in "$@"; do f="$a"; done\ncp "$f" "{record}"\n'
                          'echo "Submitted batch job 4242"\n')}
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)


def test_sweep_submits_one_array_with_a_folder_per_value(data_dir, tmp_path, monkeypatch, capsys):
    record = tmp_path / "submitted.sh"
    _stub_slurm(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sweep"
    args = [CONFIG, "--out", str(out), *_cluster_overrides(data_dir), "--sweep", "train.lr=1e-4,3e-4"]
    assert slurm.main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert slurm.main(args) == 0  # through AutoExecutor(cluster="slurm") and the stub sbatch
    assert "submitted job 4242_0" in capsys.readouterr().out
    submitted = record.read_text()
    assert submitted == dry.split("\n# task 0")[0].rstrip("\n") + "\n"  # --dry-run shows exactly what is submitted
    assert _sbatch_flags(submitted)["array"] == "0-1%2"
    jobs = {}
    for task in (0, 1):
        delayed = pickle.loads((out / "submitit" / f"4242_{task}" / f"4242_{task}_submitted.pkl").read_bytes())
        job = delayed.function
        jobs[job.out] = job.config["train"]["lr"]
        assert job.config["slurm"]["nodes"] == 2 and job.config["data"]["dir"] == str(data_dir.resolve())
    assert jobs == {str(out.resolve() / "train.lr=1e-4"): 1e-4, str(out.resolve() / "train.lr=3e-4"): 3e-4}


def test_parse_sweeps_and_bad_requests(data_dir, tmp_path, capsys):
    assert slurm.parse_sweeps([]) == [[]]
    assert slurm.parse_sweeps(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]
    with pytest.raises(ConfigError, match="key=v1,v2"):
        slurm.parse_sweeps(["train.lr"])
    # 2 nodes x 3 GPUs = 6 tasks cannot form tensor-parallel groups of 4: refused before submitting.
    bad = [CONFIG, "--out", str(tmp_path / "x"), f"data.dir={data_dir}", "slurm.nodes=2", "slurm.gpus_per_node=3",
           "parallel.tp=4", "--dry-run"]
    assert slurm.main(bad) == 2
    assert "world size 6 is not divisible by parallel.tp" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real submitit job
def _run_overrides(data_dir) -> list[str]:
    return [f"data.dir={data_dir}", "data.seq_len=32", "model.hidden_size=32", "model.n_blocks=2", "model.n_heads=4",
            "model.cond_dim=16", "model.dropout=0.1", "train.global_batch=16", "train.micro_batch=8",
            f"train.steps={STEPS}", "train.log_every=1", "train.val_every=1000", "train.save_every=1000",
            "train.ema=0.9", "train.precision=fp32", "logging.progress=false", "slurm.nodes=1",
            "slurm.gpus_per_node=2", "slurm.time_min=20"]


def _train(out, overrides) -> bool:
    from edlm_dist.training.trainer import train

    train(load_config(CONFIG, overrides), out)
    return True


def _logged(out: Path) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def _task_pids(controller_pid: int) -> list[int]:
    """The submitit local controller's children: one process per task."""
    return [int(p) for p in Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text().split()]


@pytest.mark.multirank
def test_local_two_task_job_preempted_requeues_and_resumes_exactly(data_dir, tmp_path):
    reference = tmp_path / "reference"
    run_on_ranks(_train, 2, str(reference), _run_overrides(data_dir))  # the uninterrupted run, same 2 ranks
    expected = dict(_logged(reference))
    assert sorted(expected) == list(range(1, STEPS + 1))

    out = tmp_path / "preempted"
    (job,) = slurm.submit(CONFIG, str(out), _run_overrides(data_dir), cluster="local")
    controller_pid = int(job.job_id)  # a local job's id is its controller's pid
    signalled = False
    deadline = time.monotonic() + 300
    while not job.done() and time.monotonic() < deadline:
        if not signalled and max((s for s, _ in _logged(out)), default=0) >= 2:
            for pid in _task_pids(controller_pid):  # what SLURM does before a time limit / preemption
                os.kill(pid, signal.SIGUSR2)
            signalled = True
        time.sleep(0.01)
    assert job.state == "FINISHED", f"the submitit job ended as {job.state}"
    assert signalled, "training never started"
    results = job.results()
    stopped_at = results[0]["start_step"]
    assert 2 <= stopped_at < STEPS, "the signal arrived after training ended; the job was not preempted"
    # Both tasks were requeued once (by submitit's checkpoint()) and resumed from the preemption checkpoint.
    assert [(r["rank"], r["requeues"], r["start_step"], r["step"]) for r in results] == [
        (0, 1, stopped_at, STEPS), (1, 1, stopped_at, STEPS)]
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file()
    # Every step was logged once (nothing re-run, nothing skipped) with the uninterrupted run's loss, bit for bit.
    logged = _logged(out)
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    for step, loss in logged:
        assert loss == expected[step], f"step {step}: {loss!r} != uninterrupted {expected[step]!r}"
    from safetensors.torch import load_file

    got = load_file(str(out / "weights" / "ema.safetensors"))
    want = load_file(str(reference / "weights" / "ema.safetensors"))
    assert all((got[k] == want[k]).all() for k in want)
