"""Run logging: JSONL records round-trip, only the main rank writes, wandb offline needs no network."""

from __future__ import annotations

import json

from edlm_dist.config.schema import LoggingConfig
from edlm_dist.training.metrics_logger import MetricsLogger, read_metrics


def test_jsonl_records_round_trip_and_non_finite_values_stay_valid_json(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb_mode="disabled"))
    logger.log({"loss": 1.25, "grad_norm": float("nan")}, step=3, console=False)
    logger.log({"val_loss": 0.5}, step=4, console=False)
    logger.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows] == [(3, 1.25, None), (4, None, 0.5)]
    assert rows[0]["grad_norm"] == "nan"
    assert not (tmp_path / "wandb").exists()


def test_non_main_rank_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", LoggingConfig(wandb_mode="offline"), enabled=False)
    logger.log({"loss": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_wandb_offline_writes_a_local_run_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb_mode="offline"), run_config={"train": {"lr": 0.1}})
    logger.log({"loss": 2.0}, step=1, console=False)
    logger.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.0
