"""launchers/slurm.py without a cluster: the sbatch file of --dry-run, sweeps and refused requests.
Jobs on a real cluster: tests/launchers/test_slurm_training.py and test_slurm_jobs.py (marker `slurm`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edlm_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from launchers import slurm  # noqa: E402
from slurm_helpers import prepare  # noqa: E402

CONFIG = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("slurm_data"))


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
    # srun gets the CPUs itself (Slurm 22.05-23.02 do not pass --cpus-per-task on), a dead task ends the step,
    # and every task sees the node's GPUs (LOCAL_RANK picks one, as DeepSpeed's set_device(LOCAL_RANK) assumes).
    assert " --cpus-per-task=10 --kill-on-bad-exit=1 --gpu-bind=none " in srun[0]
    assert not out.exists()  # a dry run writes nothing


def test_cpu_nodes_request_no_gpus(data_dir, tmp_path, capsys):
    args = [CONFIG, "--out", str(tmp_path / "run"), f"data.dir={data_dir}", "slurm.nodes=2", "slurm.gpus_per_node=0",
            "slurm.tasks_per_node=4", "slurm.cpus_per_task=3", "train.global_batch=64", "train.micro_batch=8",
            "--dry-run"]
    assert slurm.main(args) == 0
    text = capsys.readouterr().out
    flags = _sbatch_flags(text)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["cpus-per-task"]) == ("2", "4", "3")
    assert "gpus-per-node" not in flags and "--gpu-bind" not in text
    assert slurm.main([*args[:-1], "slurm.tasks_per_node=0", "--dry-run"]) == 2
    assert "slurm.gpus_per_node=0 (CPU nodes) needs slurm.tasks_per_node >= 1" in capsys.readouterr().err


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
    assert slurm.main([CONFIG, "--out", str(tmp_path / "x"), f"data.dir={data_dir}", "--command", "sample",
                       "--dry-run"]) == 2  # sample's inputs are checked before anything is queued
    assert "sample.diffusion_ckpt is empty" in capsys.readouterr().err


def test_plain_srun_layout_and_master_from_node_lists(monkeypatch):
    """`srun python -m edlm_dist.cli train ...` without submitit: ranks from SLURM_*, MASTER_ADDR = the first
    host of SLURM_JOB_NODELIST (checked against `scontrol show hostnames` in test_slurm_training.py; the
    suffix form is what newer Slurm versions accept and 22.05's scontrol refuses)."""
    from edlm_dist.parallel.runtime import discover_environment, first_slurm_host, job_master_port

    for nodelist, first in (("node[1-4]-ib", "node1-ib"), ("r[1-2]n[0-3]", "r1n0"), ("node[003-005,9]", "node003"),
                            ("gpu-[01-02],cpu1", "gpu-01"), ("a,b[1-2]", "a"), ("login1", "login1")):
        assert first_slurm_host(nodelist) == first, nodelist
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # set, then delete: monkeypatch then restores (removes) what discover_environment writes, which
        # would otherwise travel with every later `sbatch` of this process (--export=ALL) into the jobs
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "r[1-2]n[0-1]-ib")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert discover_environment() == {"rank": 5, "world_size": 8, "local_rank": 1}
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"]) == ("r1n0-ib", "5")
    assert os.environ["MASTER_PORT"] == str(job_master_port("4242"))


def test_job_ports_avoid_the_ephemeral_range_and_move_on_requeue():
    """A SLURM job's rendezvous port lies below the ports Linux gives outgoing connections (this machine's
    own ip_local_port_range when it has one), differs between the jobs a node runs in a row and between the
    restarts of one job, and is a function of the job id and restart count alone (every task agrees)."""
    from edlm_dist.parallel.runtime import job_master_port

    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral_low = int(range_file.read_text().split()[0]) if range_file.is_file() else 32768
    for first in (1, 90, 999_990, 2**31 - 5000):
        ports = [job_master_port(str(job)) for job in range(first, first + 4000)]
        assert len(set(ports)) == len(ports) and 1024 < min(ports) and max(ports) < ephemeral_low
        requeued = [job_master_port(str(job), restarts=1) for job in range(first, first + 4000)]
        assert all(a != b for a, b in zip(ports, requeued)) and max(requeued) < ephemeral_low
    assert job_master_port("123_4") == job_master_port("123_4") and job_master_port("123_4") < ephemeral_low
