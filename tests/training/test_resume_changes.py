"""Resuming with a changed config: each key is applied, refused by name, or known to be unused by training.

The run-level behaviour (a changed train.lr really trains at the new rate; a changed seed is refused) is
in the reliability scenarios ``resume_changed_lr_applied`` and ``resume_changed_seed``; here the policy
table and the optimizer/scheduler re-application are checked against independent computations.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from edlm_dist.config import schema
from edlm_dist.config.load import config_to_dict
from edlm_dist.config.schema import RunConfig, TrainConfig
from edlm_dist.errors import CheckpointError
from edlm_dist.parallel.deepspeed_engine import lr_lambda
from edlm_dist.training.resume import APPLIED, FIXED, UNUSED, apply_hyperparameters, review_changes, rule_for


def _keys(cls=RunConfig, prefix=""):
    hints = typing.get_type_hints(cls, vars(schema))
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_has_a_resume_rule():
    assert {rule_for(key) for key in _keys()} <= {FIXED, APPLIED, UNUSED}


def test_changed_keys_are_refused_by_name_or_sorted_into_applied_and_unused():
    saved = config_to_dict(RunConfig())
    cfg = RunConfig()
    cfg.train.lr, cfg.sample.k = 1e-3, 4
    changes = review_changes(saved, cfg, "ckpt")
    assert changes[APPLIED] == ["train.lr 0.0003 -> 0.001"] and changes[UNUSED] == ["sample.k 2 -> 4"]
    cfg.train.seed, cfg.model.hidden_size = 9, 128
    with pytest.raises(CheckpointError) as caught:
        review_changes(saved, cfg, "ckpt")
    text = str(caught.value)
    assert "model.hidden_size 64 -> 128" in text and "train.seed 1 -> 9" in text and "train.lr" not in text


def _optimizer_after(train: TrainConfig, steps: int):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps,
                                  weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    for _ in range(steps):
        param.grad = torch.full_like(param, 0.5)
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_new_hyperparameters_replace_the_restored_ones():
    old = TrainConfig(lr=3e-3, warmup_steps=4, lr_schedule="cosine", steps=20, beta1=0.9, weight_decay=0.0)
    new = dataclasses.replace(old, lr=1e-3, beta1=0.8, weight_decay=0.1)
    optimizer, scheduler = _optimizer_after(old, 6)  # as a checkpoint of step 6 restores them
    apply_hyperparameters(optimizer, scheduler, new)
    factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (6 - 4) / (20 - 4), dtype=torch.float64))).item()
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * factor, rel=1e-12)  # closed-form cosine at step 6
    assert group["betas"] == (0.8, new.beta2) and group["weight_decay"] == 0.1
    scheduler.step()  # and the schedule goes on from the new base rate
    later = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 16, dtype=torch.float64))).item()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * later, rel=1e-12)


def test_unchanged_config_keeps_the_scheduler_bit_for_bit():
    train = TrainConfig(lr=3e-3, warmup_steps=4, lr_schedule="cosine", steps=20)
    optimizer, scheduler = _optimizer_after(train, 7)
    before = (optimizer.param_groups[0]["lr"], scheduler.get_last_lr()[0])
    apply_hyperparameters(optimizer, scheduler, train)
    assert (optimizer.param_groups[0]["lr"], scheduler.get_last_lr()[0]) == before
