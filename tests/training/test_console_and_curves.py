"""Training explains itself: a console line per logged step, an end-of-run summary naming the weights, a
loss-curve PNG; metrics.jsonl holds each step once after a resume; WANDB_* variables are honoured."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import pytest

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import LoggingConfig
from edlm_dist.errors import ConfigError
from tests.spawn import run_on_ranks
from edlm_dist.training.metrics_logger import MetricsLogger, console_logger, read_metrics, wandb_settings
from edlm_dist.training.trainer import Trainer

from training_helpers import tiny_overrides


def _train(data, out, stop_after=None, **extra) -> str:
    """One training run in a forked rank (the test process must not initialise torch.distributed);
    returns what it printed on the console."""
    cfg = load_config(None, tiny_overrides(data, **{"train.steps": 4, "train.log_every": 2, "train.val_every": 4,
                                                    "train.val_batches": 1, **extra}))
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    console_logger().addHandler(handler)  # the trainer's console logger, also writing here
    try:
        with contextlib.redirect_stderr(console):
            trainer = Trainer(cfg, out)
            try:
                trainer.train(stop_after=stop_after)
            finally:
                trainer.close()
    finally:
        logging.getLogger("edlm").removeHandler(handler)
    return console.getvalue()


def test_console_lines_summary_and_loss_curve(synthetic_data, tmp_path):
    (printed,) = run_on_ranks(_train, 1, str(synthetic_data), str(tmp_path / "run"))
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert "loss " in lines[0] and "tok/s" in lines[0] and "val " in lines[1]
    assert "trained mdlm for 4 steps" in printed and str(tmp_path / "run" / "weights") in printed
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_run_logs_each_step_once(synthetic_data, tmp_path):
    out = tmp_path / "run"
    run_on_ranks(_train, 1, str(synthetic_data), str(out), 2, **{"train.log_every": 1})  # checkpoint at step 2
    with (out / "metrics.jsonl").open("a") as handle:  # a killed run had logged step 3 after that checkpoint
        handle.write(json.dumps({"step": 3, "time": 0.0, "loss": 123.0}) + "\n")
    run_on_ranks(_train, 1, str(synthetic_data), str(out), **{"train.log_every": 1})
    rows = read_metrics(out)
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [1, 2, 3, 4] and 123.0 not in [r["loss"] for r in rows if "loss" in r]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(rows)  # the file itself, not only readers


def test_read_metrics_keeps_the_last_of_repeated_rows(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig())
    for step, loss in ((1, 1.0), (2, 2.0), (2, 2.5), (3, 3.0)):
        logger.log({"loss": loss}, step=step, console=False)
    logger.log({"val_loss": 9.0}, step=2, console=False)  # other keys at the same step are another row
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path)] == [
        (1, 1.0, None), (2, 2.5, None), (3, 3.0, None), (2, None, 9.0)]


def test_wandb_variables(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert wandb_settings(LoggingConfig(), tmp_path, "mdlm") == {"mode": "disabled", "project": "edlm-dist",
                                                                "name": "mdlm", "dir": str(tmp_path)}
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.setenv("WANDB_NAME", "trial")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w"))
    assert wandb_settings(LoggingConfig(), tmp_path, "mdlm") == {"mode": "offline", "project": "mine",
                                                                "name": "trial", "dir": str(tmp_path / "w")}
    explicit = LoggingConfig(wandb_mode="online", wandb_project="set", run_name="named")
    assert wandb_settings(explicit, tmp_path, "mdlm")["mode"] == "offline"  # the environment wins for the mode
    assert wandb_settings(explicit, tmp_path, "mdlm")["project"] == "set"  # an explicit config value is kept
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_settings(LoggingConfig(), tmp_path, "mdlm")["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        wandb_settings(LoggingConfig(), tmp_path, "mdlm")
