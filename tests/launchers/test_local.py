"""launchers/local.py: N ranks on one node — TP=2 trains like one process, DP=2 ranks hold identical
weights, a failing rank takes its peers down, bad layouts are refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig
from tests.spawn import run_on_ranks

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from launchers import local  # noqa: E402
from slurm_helpers import prepare  # noqa: E402  (the launchers' tests share one tiny data set recipe)
from tests.tolerances import assert_close_across, network_reduction_size  # noqa: E402

pytestmark = pytest.mark.multirank
CONFIG = str(REPO / "configs" / "demo.yaml")
STEPS = 6
# per step: the tiny AR model's forward, then the loss's sum over 16 rows × 31 targets
STEP_N = network_reduction_size(ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16), 32, 35) + 16 * 31


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("local_data"), rows=1000)


def _overrides(data_dir, **extra) -> list[str]:
    base = {"data.dir": str(data_dir), "data.seq_len": 32, "model.hidden_size": 32, "model.n_blocks": 2,
            "model.n_heads": 4, "model.cond_dim": 16, "train.global_batch": 16, "train.micro_batch": 8,
            "train.steps": STEPS, "train.log_every": 1, "train.val_every": 1000, "train.save_every": 1000,
            "train.ema": 0.9, "train.precision": "fp32", "logging.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(out, overrides) -> bool:
    from edlm_dist.training.trainer import train

    train(load_config(CONFIG, overrides), out)
    return True


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_tp2_run_trains_like_a_single_process(data_dir, tmp_path):
    overrides = _overrides(data_dir, **{"train.objective": "ar"})  # no noise: the data alone drives the steps
    tp2 = tmp_path / "tp2"
    assert local.main([CONFIG, "--out", str(tp2), "--nproc", "2", "parallel.tp=2", *overrides]) == 0
    shards = sorted(p.name for p in (tp2 / "checkpoints" / f"step_{STEPS:08d}").glob("mp_rank_*_model_states.pt"))
    assert shards == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]  # really two TP ranks

    single = tmp_path / "single"
    run_on_ranks(_train, 1, str(single), overrides)
    assert len(_losses(tp2)) == STEPS
    assert_close_across(torch.tensor(_losses(tp2)), torch.tensor(_losses(single)), dtype=torch.float32,
                        reduction_size=STEPS * STEP_N)
    for name in ("model.safetensors", "ema.safetensors"):
        got, want = load_file(str(tp2 / "weights" / name)), load_file(str(single / "weights" / name))
        assert got.keys() == want.keys()
        for key in want:  # float32 reduction order differs between TP=2 and TP=1, nothing else
            assert_close_across(got[key], want[key], dtype=torch.float32, reduction_size=STEPS * STEP_N)


RANK_DUMP = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.sharded_state import full_state_dict
    from edlm_dist.parallel.runtime import shutdown_parallel
    from edlm_dist.training.trainer import Trainer

    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(config, overrides), out)
    trainer.train()
    ctx = trainer.ctx
    name = f"rank{ctx.rank}_dp{ctx.dp_rank}of{ctx.dp_size}.safetensors"
    save_file(full_state_dict(trainer.engine.module), f"{out}/{name}")
    trainer.close()
    shutdown_parallel()
""")


def test_dp2_ranks_end_with_identical_weights(data_dir, tmp_path):
    script = tmp_path / "rank_dump.py"
    script.write_text(RANK_DUMP)
    out = tmp_path / "dp2"
    command = [sys.executable, str(script), CONFIG, str(out), *_overrides(data_dir, **{"train.zero_stage": 1})]
    assert local.launch(command, 2) == 0
    rank0, rank1 = (load_file(str(out / f"rank{r}_dp{r}of2.safetensors")) for r in (0, 1))
    exported = load_file(str(out / "weights" / "model.safetensors"))
    initial = _initial_weights(_overrides(data_dir))
    for key in exported:
        assert torch.equal(rank0[key], rank1[key]) and torch.equal(rank0[key], exported[key]), key
    assert any(not torch.equal(exported[k], initial[k]) for k in exported)  # it trained


def _initial_weights(overrides):
    """The run's weights before training (a dense model in this process: no process group needed)."""
    from edlm_dist.models.build import build_model

    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(cfg.train.seed)
    return {k: v.detach().clone() for k, v in build_model("dit", cfg.model, 35, 32).named_parameters()}


FAILING_RANKS = textwrap.dedent("""
    import os, sys, time
    if os.environ["RANK"] == "1":  # fail once rank 0 is up and blocked (as in a collective)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
        sys.exit(7)
    open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
""")


def test_a_failing_rank_takes_its_peers_down(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANKS)
    pid_file = tmp_path / "rank0.pid"
    assert local.launch([sys.executable, str(script), str(pid_file)], 2, shutdown_timeout_s=1) == 7
    with pytest.raises(ProcessLookupError):  # rank 0 was stopped and reaped, not left sleeping
        os.kill(int(pid_file.read_text()), 0)


PREEMPTED_RANKS = textwrap.dedent("""
    import os, signal, sys, time
    def checkpoint_and_stop(signum, frame):  # what the trainer does: finish the step, checkpoint, exit 3
        open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + "." + signal.Signals(signum).name), "w").close()
        sys.exit(3)
    signal.signal(signal.SIGUSR1, checkpoint_and_stop)
    signal.signal(signal.SIGTERM, checkpoint_and_stop)
    open(os.path.join(sys.argv[1], "ready" + os.environ["RANK"]), "w").close()
    time.sleep(600)
""")

DRIVER = "import sys; from launchers import local; sys.exit(local.launch(sys.argv[1:], 2, shutdown_timeout_s=30))"


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_reaches_every_rank_and_the_launcher_returns_the_requeue_code(tmp_path, signum):
    script = tmp_path / "ranks.py"
    script.write_text(PREEMPTED_RANKS)
    launcher = subprocess.Popen([sys.executable, "-c", DRIVER, sys.executable, str(script), str(tmp_path)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
            time.sleep(0.05)
        launcher.send_signal(signum)
        assert launcher.wait(timeout=60) == local.REQUEUE_EXIT_CODE
    finally:
        if launcher.poll() is None:
            launcher.kill()
    name = signal.Signals(signum).name
    assert (tmp_path / f"rank0.{name}").exists() and (tmp_path / f"rank1.{name}").exists()


def test_layout_errors_are_refused_before_spawning(data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert local.main([CONFIG, "--out", str(out), "--nproc", "3", "parallel.tp=2", *_overrides(data_dir)]) == 2
    assert "world size 3 is not divisible by parallel.tp" in capsys.readouterr().err
    assert not out.exists()
    assert local.combined_exit_code([0, 3]) == 3 and local.combined_exit_code([3, -9]) == -9
    assert local.combined_exit_code([0, 0]) == 0
