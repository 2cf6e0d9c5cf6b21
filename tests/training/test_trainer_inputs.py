"""`edlm train` refuses a config without data before it starts a process group or writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from edlm_dist.config.load import load_config
from edlm_dist.errors import ConfigError
from edlm_dist.training.trainer import run_training

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_empty_data_dir_is_refused_before_any_work(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml")  # no data.dir
    with pytest.raises(ConfigError, match=r"data.dir is empty; run `edlm prepare-data"):
        run_training(cfg, tmp_path / "run")
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()
