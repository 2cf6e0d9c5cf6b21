"""Run logging: console lines, a JSONL metrics file per run, a loss-curve PNG, and wandb.

Only the main rank writes. wandb is ``disabled`` by default (tests, CI); ``offline`` writes under
the run directory and needs no network; ``online`` falls back to offline when the service cannot
be reached, so a training run never blocks on the network. The standard variables apply:
``WANDB_MODE`` (disabled | offline | online, also dryrun / run) wins over ``logging.wandb_mode``,
``WANDB_PROJECT`` and ``WANDB_NAME`` fill ``logging.wandb_project`` / ``run_name`` when those are left
at their defaults, ``WANDB_DIR`` moves the wandb files (default: the run folder), and wandb itself reads
the others (``WANDB_ENTITY``, ``WANDB_API_KEY``, ``WANDB_TAGS``, ``WANDB_RUN_GROUP``, ...).

``metrics.jsonl`` holds one row per logged step. A run resumed from a checkpoint at step ``S`` first
drops the rows after ``S`` (:meth:`MetricsLogger.rewind`: those steps are recomputed bit for bit), so
a reader never sees a step twice; :func:`read_metrics` also keeps only the last row of a repeated
``(step, keys)`` for files written before that. Rows are appended whole or not at all
(:func:`edlm_dist.storage.files.append_line`); a last line torn by a killed process is skipped by the
reader and dropped by the next append or resume.
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
from edlm_dist.errors import ConfigError
from edlm_dist.storage.files import append_line, read_jsonl, write_atomic, write_with

METRICS_FILENAME = "metrics.jsonl"
REPAIR_HINT = "edit or delete that line of {path} (the next resume rewrites the file)"
LOSS_CURVE_FILENAME = "loss_curve.png"
WANDB_MODES = {"disabled": "disabled", "offline": "offline", "online": "online", "dryrun": "offline", "run": "online"}
DEFAULT_PROJECT = LoggingConfig().wandb_project


def wandb_settings(cfg: LoggingConfig, out_dir: str | os.PathLike, name: str) -> dict:
    """``mode``, ``project``, ``name`` and ``dir`` for ``wandb.init``: the config, with the WANDB_* variables."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or cfg.wandb_mode
    if mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r} is not a wandb mode; use disabled, offline or online")
    project = cfg.wandb_project if cfg.wandb_project != DEFAULT_PROJECT else os.environ.get("WANDB_PROJECT",
                                                                                             DEFAULT_PROJECT)
    return {"mode": WANDB_MODES[mode], "project": project,
            "name": cfg.run_name or os.environ.get("WANDB_NAME") or name,
            "dir": os.environ.get("WANDB_DIR") or str(out_dir)}


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
        settings = wandb_settings(cfg, out_dir, name)
        if settings["mode"] != "disabled":
            self._wandb = self._start_wandb(settings, run_config)

    def _start_wandb(self, settings: dict, run_config):
        import wandb

        Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
        quiet = wandb.Settings(init_timeout=30, silent=True)
        try:
            return wandb.init(**settings, config=run_config, settings=quiet, reinit="finish_previous")
        except Exception as exc:  # no network / no login: keep training, keep the metrics offline
            self.console.warning("wandb %s failed (%s); continuing with wandb offline", settings["mode"],
                                 str(exc).splitlines()[0])
            return wandb.init(**{**settings, "mode": "offline"}, config=run_config, settings=quiet,
                              reinit="finish_previous")

    def rewind(self, step: int) -> None:
        """Drop the rows after ``step`` (a resumed run logs those steps again) and a torn last line; atomic."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_jsonl(self.path, fix=REPAIR_HINT.format(path=self.path))
        kept = [row for row in rows if row.get("step", 0) <= step]
        text = "".join(json.dumps(row) + "\n" for row in kept)
        if text.encode() != self.path.read_bytes():
            write_atomic(self.path, text)

    def log(self, metrics: dict[str, Any], step: int, *, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        append_line(self.path, json.dumps(record))  # whole or not at all (disk full: one error line)
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
    """The rows of ``metrics.jsonl`` in order; of rows repeating a ``(step, keys)`` only the last is kept."""
    path = Path(out_dir) / METRICS_FILENAME
    if not path.exists():
        return []
    rows = read_jsonl(path, fix=REPAIR_HINT.format(path=path))  # a torn last line (killed writer) is skipped
    last = {(row.get("step"), tuple(sorted(k for k in row if k != "time"))): i for i, row in enumerate(rows)}
    return [row for i, row in enumerate(rows) if i in set(last.values())]


def progress_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """One console line: ``step 200/600  loss 2.3456  val 2.4012  lr 3.0e-04  grad 0.812  14.2k tok/s``."""
    parts = [f"step {step}/{total}"]
    for key, label, spec in (("loss", "loss", ".4f"), ("val_loss", "val", ".4f"), ("lr", "lr", ".1e"),
                             ("grad_norm", "grad", ".3g")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{label} {metrics[key]:{spec}}")
    if isinstance(metrics.get("tokens_per_s"), (int, float)):
        parts.append(f"{metrics['tokens_per_s'] / 1e3:.1f}k tok/s")
    return "  ".join(parts)


def plot_loss_curve(out_dir: str | os.PathLike, title: str = "") -> Optional[Path]:
    """``loss_curve.png``: training and validation loss against the step; None when nothing was logged."""
    rows = read_metrics(out_dir)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    valid = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "train loss", "-"), (valid, "validation loss (EMA)", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or Path(out_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / LOSS_CURVE_FILENAME
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
