"""Resuming with a changed config: every changed key is applied and logged, or refused by name.

A run resumes from ``OUT/checkpoints/latest`` with the config it is launched with. The checkpoint records
the config it was written under; each key that differs falls in one of three classes (:data:`RULES`, by
dotted key or section prefix, the longest match wins; ``tests/training/test_resume_changes.py`` checks
that every key of the schema has one):

* ``FIXED`` -- the run would no longer be the same run: the model's shape, the objective, the data stream
  (its order, batch split and seeds), the parallel layout, ZeRO stage and precision (the saved optimizer
  state has their layout), the seed (the random streams are restored from the checkpoint, so a new seed
  would silently do nothing). Any change is refused with one line naming every such key.
* ``APPLIED`` -- takes effect from the first resumed step: learning rate and schedule, AdamW's
  hyper-parameters, grad clipping, EMA decay, the number of steps, dropout, the NCE estimator's settings,
  cadences (log/val/save), logging, timeouts, data-read retries and where the (same) data lives. The
  checkpoint's optimizer and LR-scheduler state would otherwise restore the old values, so
  :func:`apply_hyperparameters` re-applies the config after loading.
* ``UNUSED`` -- keys ``edlm train`` does not read (sampling, evaluation, pipeline, Slurm, prepare-data only).

Changes are logged (``resume: applying ...``) and the new config is what ``config.yaml`` and the weights'
``meta.json`` record.
"""

from __future__ import annotations

from typing import Any

from edlm_dist.config.load import config_to_dict
from edlm_dist.config.schema import RunConfig, TrainConfig
from edlm_dist.errors import CheckpointError
from edlm_dist.parallel.deepspeed_engine import lr_lambda

FIXED, APPLIED, UNUSED = "fixed", "applied", "unused"
RULES = {
    "model": FIXED, "model.dropout": APPLIED, "model.activation_checkpointing": APPLIED, "model.use_apex": APPLIED,
    "data": FIXED, "data.dir": APPLIED, "data.read_retries": APPLIED, "data.retry_delay_s": APPLIED,
    "data.source": UNUSED, "data.input": UNUSED, "data.tokenizer": UNUSED, "data.tokenizer_vocab": UNUSED,
    "data.max_unk_rate": UNUSED, "data.wrap": UNUSED, "data.shard_rows": UNUSED, "data.synthetic": UNUSED,
    "parallel": FIXED, "parallel.backend": APPLIED, "parallel.timeout_s": APPLIED,
    "train": APPLIED, "train.objective": FIXED, "train.global_batch": FIXED, "train.micro_batch": FIXED,
    "train.zero_stage": FIXED, "train.precision": FIXED, "train.seed": FIXED, "train.diffusion_ckpt": FIXED,
    "logging": APPLIED,
    "sample": UNUSED, "eval": UNUSED, "pipeline": UNUSED, "slurm": UNUSED,
}
WHY_FIXED = ("the model's shape, the objective, the data stream, the parallel layout, ZeRO stage, precision and "
             "seed are part of the run")


def rule_for(key: str) -> str:
    """The class of a dotted key: its own rule, else its closest section's."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    raise KeyError(key)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, config's value)}`` for every key both know and that differs."""
    old, new = _flatten(saved or {}), _flatten(config_to_dict(cfg))
    return {key: (old[key], new[key]) for key in new if key in old and old[key] != new[key]}


def review_changes(saved: dict, cfg: RunConfig, checkpoint: str) -> dict[str, list[str]]:
    """Refuse FIXED changes (one CheckpointError line naming them); return the others by class, as text."""
    by_rule: dict[str, list[str]] = {FIXED: [], APPLIED: [], UNUSED: []}
    for key, (old, new) in sorted(config_changes(saved, cfg).items()):
        by_rule[rule_for(key)].append(f"{key} {old!r} -> {new!r}")
    if by_rule[FIXED]:
        raise CheckpointError(f"cannot resume {checkpoint} with a changed {', '.join(by_rule[FIXED])} ({WHY_FIXED}); "
                              "restore the checkpoint's values, or start a fresh run with a new --out")
    return by_rule


def apply_hyperparameters(optimizer, scheduler, train: TrainConfig) -> None:
    """Make the optimizer and LR schedule follow ``train`` after a checkpoint restored the saved ones.

    Loading restores each param group's lr/betas/eps/weight decay and the scheduler's base learning rates;
    this sets them from the config and recomputes the current lr as ``lr * schedule(step)``, exactly what
    the scheduler computes, so an unchanged config resumes bit for bit.
    """
    groups = optimizer.param_groups
    schedule = lr_lambda(train)
    scheduler.base_lrs = [train.lr for _ in groups]
    scheduler.lr_lambdas = [schedule for _ in groups]
    for group in groups:
        group.update(betas=(train.beta1, train.beta2), eps=train.adam_eps, weight_decay=train.weight_decay,
                     initial_lr=train.lr, lr=train.lr * schedule(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in groups]
