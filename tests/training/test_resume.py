"""A real SIGKILL of `edlm train` mid-run, then resume: every loss equals the uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_helpers import tiny_overrides

STEPS = 24


def _command(data_dir, out_dir, objective="mdlm") -> list[str]:
    overrides = tiny_overrides(data_dir, **{"train.steps": STEPS, "train.save_every": 6, "train.val_every": 12,
                                            "train.objective": objective, "model.dropout": 0.1})
    return [sys.executable, "-m", "edlm_dist.cli", "train", "configs/demo.yaml", "--out", str(out_dir), *overrides]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _losses(out_dir: Path) -> dict[int, float]:
    """Logged training loss per step."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _all_logged(out_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


@pytest.mark.parametrize("objective", ["mdlm"])
def test_sigkill_then_resume_is_bit_exact(synthetic_data, tmp_path, objective):
    repo = Path(__file__).resolve().parents[2]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_command(synthetic_data, reference, objective), cwd=repo, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    proc = subprocess.Popen(_command(synthetic_data, killed, objective), cwd=repo, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        # Kill once a checkpoint exists and training has moved past it (mid-run, between checkpoints).
        while time.monotonic() < deadline:
            if (killed / "metrics.jsonl").exists() and max(_losses(killed), default=0) >= 9:
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    steps_before_kill = max(_losses(killed))
    assert steps_before_kill < STEPS
    assert (killed / "checkpoints" / "latest").read_text().strip().startswith("step_")
    checkpoint_step = int((killed / "checkpoints" / "latest").read_text().strip().split("_")[1])
    before_kill = _all_logged(killed)
    assert max(step for step, _ in before_kill) > checkpoint_step, "the kill must fall between checkpoints"

    subprocess.run(_command(synthetic_data, killed, objective), cwd=repo, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    logged = _all_logged(killed)
    resumed_from = int((killed / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert resumed_from == STEPS
    # Every logged loss, before the kill and after the resume, is identical to the uninterrupted run's.
    for step, loss in before_kill + logged:
        assert loss == expected[step], f"step {step}: {loss!r} != uninterrupted {expected[step]!r}"
    # The steps logged after the checkpoint before the kill were dropped and logged again: each step once.
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_with_requeue_code(synthetic_data, tmp_path, signum):
    from edlm_dist.errors import REQUEUE_EXIT_CODE

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    command = _command(synthetic_data, out) + ["train.save_every=1000", "train.steps=400"]
    proc = subprocess.Popen(command, cwd=repo, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and _losses(out)):
        time.sleep(0.05)
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 1 <= stopped_at < 400 and max(_losses(out)) == stopped_at
