"""Every config field declares what it accepts, and `load_config` refuses anything else with one line.

The first test inspects the schema on purpose (the property is "every field has a rule"); the others
are behaviour: for every numeric field, values just outside its range and NaN / +-Inf are refused by
``load_config`` with one line naming the key, before any work; choices and named checks likewise.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from edlm_dist.config import schema
from edlm_dist.config.fields import RULE_KEYS, Range, check_fields
from edlm_dist.config.load import load_config
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import ConfigError


def _leaves(cls=RunConfig, prefix=""):
    hints = typing.get_type_hints(cls, vars(schema))
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind, dict(f.metadata)


LEAVES = list(_leaves())


def _base(kind):
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:  # Optional[str]
        return next(a for a in args if a is not type(None))
    return kind


def test_every_field_declares_what_it_accepts():
    missing = []
    for key, kind, meta in LEAVES:
        base = _base(kind)
        if base is bool:
            continue
        if base in (int, float) and "range" not in meta:
            missing.append(f"{key}: a number without a range")
        elif base is str and not ("choices" in meta or "check" in meta):
            missing.append(f"{key}: a string without choices or a check")
        elif typing.get_origin(base) is list and not any(k in meta for k in RULE_KEYS):
            missing.append(f"{key}: a list without a rule for its items")
        elif base is typing.Any and "check" not in meta:
            missing.append(f"{key}: a free-form field without a check")
    assert missing == [], "declare these with config.fields.number/choice/text (...)"
    check_fields(RunConfig())  # and every default passes its own rule


def _outside(rule: Range, integer: bool) -> list:
    def step(bound):
        return 1 if integer else max(0.5, abs(bound) * 1e-6)

    values = []
    if rule.lo is not None:
        values.append(rule.lo if rule.lo_open else rule.lo - step(rule.lo))
    if rule.hi is not None:
        values.append(rule.hi if rule.hi_open else rule.hi + step(rule.hi))
    return values


NUMERIC = [(key, _base(kind), meta) for key, kind, meta in LEAVES if "range" in meta]


def _set(cfg: RunConfig, key: str, value) -> RunConfig:
    section, name = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
        node = getattr(node, part)
    setattr(node, name, value)
    return cfg


def _refused(key: str, value) -> str:
    """check_fields (what load_config runs first) on a default config with ``key`` set to ``value``."""
    with pytest.raises(ConfigError) as info:
        check_fields(_set(RunConfig(), key, value))
    message = str(info.value)
    assert "\n" not in message and key in message, message
    return message


@pytest.mark.parametrize("key, kind, meta", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_numbers_outside_their_range_are_refused(key, kind, meta):
    is_list = meta.get("list", False)
    integer = (typing.get_args(kind) or (kind,))[0] is int if is_list else kind is int
    for value in _outside(meta["range"], integer):
        message = _refused(key, [value] if is_list else value)
        assert "must be" in message, message
    if not integer:
        for value in (float("nan"), float("inf"), float("-inf")):
            assert "finite" in _refused(key, value)


CHOICES = [(key, meta) for key, kind, meta in LEAVES if "choices" in meta]


@pytest.mark.parametrize("key, meta", CHOICES, ids=[k for k, _ in CHOICES])
def test_strings_outside_their_choices_are_refused(key, meta):
    value = ["nonsense"] if meta.get("list") else "nonsense"
    assert "is not valid; use one of" in _refused(key, value)
    if meta.get("list"):
        assert "must hold at least one of" in _refused(key, [])


CHECKED = [key for key, kind, meta in LEAVES if "check" in meta and _base(kind) is str]


@pytest.mark.parametrize("key", CHECKED)
def test_checked_strings_refuse_control_characters(key):
    """A newline in a path, a Slurm name or a run name would break the scripts and logs they end up in."""
    message = _refused(key, "bad\nvalue")
    assert "control character" in message or "holds '\\n'" in message, message


@pytest.mark.parametrize("overrides, fragment", [
    (["train.beta1=1.5"], "train.beta1 must be < 1 (got 1.5)"),
    (["train.beta2=-0.1"], "train.beta2 must be >= 0 (got -0.1)"),
    (["train.lr=1e999"], "train.lr must be a finite number in (0, 1] (got inf)"),
    (["train.lr=nan"], "train.lr must be a finite number"),
    (["slurm.nodes=0"], "slurm.nodes must be >= 1 (got 0)"),
    (["slurm.gpus_per_node=-1"], "slurm.gpus_per_node must be >= 0 (got -1)"),
    (["slurm.gpus_per_node=0"], "slurm.gpus_per_node=0 (CPU nodes) needs slurm.tasks_per_node >= 1"),
    (["slurm.time_min=-5"], "slurm.time_min must be >= 1 (got -5)"),
    (["slurm.partition=gpu;rm"], "slurm.partition='gpu;rm' holds ';'"),
    (["data.retry_delay_s=inf"], "data.retry_delay_s must be a finite number"),
    (["data.max_unk_rate=1.5"], "data.max_unk_rate must be <= 1 (got 1.5)"),
    (["data.tokenizer=gtp2"], "data.tokenizer='gtp2' is neither a tokenizer name"),
    (["eval.judge_order=0"], "eval.judge_order must be >= 1 (got 0)"),
    (["pipeline.methods=[mdlm,edlm-gan]"], "pipeline.methods[1]='edlm-gan' is not valid"),
    (["pipeline.nce_steps=0", "pipeline.methods=[edlm-nce]"], "pipeline.nce_steps=0 but pipeline.methods has edlm-nce"),
    (["sample.window=[0.5,nan]"], "sample.window"),
])
def test_examples_name_the_key_the_value_and_the_range(overrides, fragment):
    """Through load_config, from the text a user types (OmegaConf reads 1e999 as inf)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)
