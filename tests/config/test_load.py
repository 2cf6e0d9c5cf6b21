from __future__ import annotations

import pytest
import yaml

from edlm_dist.config.load import config_from_dict, config_to_dict, load_config, save_config, validate_world
from edlm_dist.errors import ConfigError


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 7, "lr": 1e-3}, "model": {"n_heads": 2}}))
    cfg = load_config(path, ["train.steps=9", "sample.k=4"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.n_heads, cfg.sample.k) == (9, 1e-3, 2, 4)


def test_preset_fills_model_sizes():
    cfg = load_config(None, ["model.preset=small"])
    assert (cfg.model.hidden_size, cfg.model.n_blocks, cfg.model.n_heads, cfg.model.cond_dim) == (768, 12, 12, 128)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["train.lr=fast"], "wrong type for config key 'train.lr'"),
        (["train.steps"], "not of the form key=value"),
        (["parallel.tp=3"], "does not divide model.n_heads"),
        (["model.hidden_size=66", "model.n_heads=4"], "not divisible by model.n_heads"),
        (["model.hidden_size=66", "model.n_heads=2"], "head dim"),
        (["parallel.pp=2"], "pipeline parallelism"),
        (["sample.k=0"], "sample.k must be >= 1"),
        (["sample.window=1.5"], "sample.window must be in [0, 1]"),
        (["sample.steps=0"], "sample.steps must be >= 1"),
        (["train.global_batch=10", "train.micro_batch=4"], "not a multiple"),
        (["model.preset=huge"], "model.preset 'huge' is unknown"),
        (["train.objective=gan"], "train.objective='gan' is not valid"),
        (["model.block_size=5"], "model.block_size=5 must divide data.seq_len=32"),
        (["model.block_size=4", "model.time_conditioning=true"], "needs model.time_conditioning=false"),
        (["train.sampling_eps=0.5", "train.sampling_eps_max=0.4"], "train.sampling_eps < train.sampling_eps_max"),
        (["pipeline.block_size=32"], "pipeline.block_size=32 must be 0"),
        (["pipeline.block_step_counts=[0]"], "pipeline.block_step_counts[0] must be >= 1"),
        (["pipeline.block_size=4", "pipeline.ar_steps=0"], "needs the ar model"),
    ],
)
def test_bad_config_gives_one_line_error(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'.*unknown.yaml"):
        load_config(unknown)


def test_world_size_rules():
    cfg = load_config(None, ["parallel.tp=2", "train.global_batch=8", "train.micro_batch=2"])
    assert validate_world(cfg, 4) == 2
    with pytest.raises(ConfigError, match="not divisible by parallel.tp"):
        validate_world(cfg, 3)
    cfg.parallel.dp = 3
    with pytest.raises(ConfigError, match="!= world size 4"):
        validate_world(cfg, 4)
    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="micro_batch\\*dp"):
        validate_world(cfg, 4)
    assert validate_world(cfg, 4, training=False) == 4  # sampling/eval do not split a training batch


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=5", "eval.metrics=[ppl]", "pipeline.step_counts=[2,3]"])
    path = save_config(cfg, tmp_path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)
