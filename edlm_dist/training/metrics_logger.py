"""Run logging: console lines, a JSONL metrics file per run, and wandb.

Only the main rank writes. wandb is ``disabled`` by default (tests, CI); ``offline`` writes under
the run directory and needs no network; ``online`` falls back to offline when the service cannot
be reached, so a training run never blocks on the network.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from edlm_dist.config.schema import LoggingConfig

METRICS_FILENAME = "metrics.jsonl"


def console_logger(name: str = "edlm") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Write metric dicts to console, ``<out>/metrics.jsonl`` and wandb (main rank only)."""

    def __init__(self, out_dir: str | os.PathLike, cfg: LoggingConfig, *, enabled: bool = True,
                 run_config: Optional[dict] = None, name: str = "train"):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILENAME
        self.console = console_logger()
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb_mode != "disabled":
            self._wandb = self._start_wandb(out_dir, cfg, run_config, name)

    def _start_wandb(self, out_dir, cfg: LoggingConfig, run_config, name):
        import wandb

        os.environ.setdefault("WANDB_DIR", str(out_dir))
        mode = cfg.wandb_mode
        settings = wandb.Settings(init_timeout=30, silent=True)
        try:
            return wandb.init(project=cfg.wandb_project, name=cfg.run_name or name, mode=mode,
                              dir=str(out_dir), config=run_config, settings=settings, reinit="finish_previous")
        except Exception as exc:  # no network / no login: keep training, keep the metrics offline
            self.console.warning("wandb %s failed (%s); continuing with wandb offline", mode, str(exc).splitlines()[0])
            return wandb.init(project=cfg.wandb_project, name=cfg.run_name or name, mode="offline",
                              dir=str(out_dir), config=run_config, settings=settings, reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int, *, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if console:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                            if k not in ("time",))
            self.console.info(text)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / METRICS_FILENAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
