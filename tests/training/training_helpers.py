"""Shared tiny-run settings for the training tests."""

from __future__ import annotations


def tiny_overrides(data_dir, **extra) -> list[str]:
    base = {
        "data.dir": str(data_dir), "data.seq_len": 32, "model.hidden_size": 32, "model.n_blocks": 2,
        "model.n_heads": 4, "model.cond_dim": 16, "train.global_batch": 16, "train.micro_batch": 8,
        "train.lr": 3e-3, "train.warmup_steps": 5, "train.log_every": 1, "train.val_every": 1000,
        "train.save_every": 1000, "train.ema": 0.9, "logging.progress": False, "train.precision": "fp32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
