"""`--help` config keys come from the schema: every key once, with the default the loader uses, and any
metadata a field carries (ranges added later appear without touching the generator)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from edlm_dist.config.describe import config_keys, describe_keys
from edlm_dist.config.schema import RunConfig


def _flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_key_once_with_the_loaders_default():
    loaded = dict(_flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig))))
    records = list(config_keys())
    assert [r["key"] for r in records] == list(loaded)
    for record in records:
        assert record["default"] == loaded[record["key"]], record["key"]
    by_key = {r["key"]: r for r in records}
    assert by_key["train.steps"]["type"] == "int" and by_key["model.preset"]["type"] == "str"
    assert "[UNK]" in by_key["data.max_unk_rate"]["help"]  # the schema's trailing comment is the help


@dataclass
class _Section:
    steps: int = field(default=3, metadata={"range": "[1, 8]", "help": "how many"})
    rate: float = 0.5  # a plain comment


@dataclass
class _Root:
    demo: _Section = field(default_factory=_Section)


def test_field_metadata_is_picked_up():
    records = {r["key"]: r for r in config_keys(_Root)}
    assert records["demo.steps"] == {"key": "demo.steps", "type": "int", "default": 3, "help": "how many",
                                     "range": "[1, 8]"}
    assert records["demo.rate"]["help"] == "a plain comment"


def test_describe_keys_lists_only_the_asked_sections():
    text = describe_keys(("data",))
    assert "data.tokenizer (str, default synthetic; accepts synthetic | char" in text and "train.steps" not in text
    assert "data.seq_len (int, default 32; range [4, " in text  # the field's range, read from the schema


def test_every_subcommand_help_lists_its_config_keys(capsys):
    import pytest

    from edlm_dist.cli import CONFIG_SECTIONS, main

    for name, sections in CONFIG_SECTIONS.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for record in config_keys():
            listed = f"  {record['key']} ({record['type']}, default" in text
            assert listed == (record["key"].split(".")[0] in sections), (name, record["key"])
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out_help = capsys.readouterr().out.split("--out OUT")[1].split("config keys")[0]
    assert "resume" not in out_help  # sampling and evaluation do not resume
