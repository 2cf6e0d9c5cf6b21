"""Fixtures for training tests: a small prepared synthetic dataset shared by the module."""

from __future__ import annotations

import pytest

from edlm_dist.config.schema import SyntheticConfig


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    from edlm_dist.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("synthetic_data")
    prepare_data("synthetic", out, seq_len=32, tokenizer_spec="synthetic",
                 synthetic_cfg=SyntheticConfig(train_rows=4000, valid_rows=512), seed=1, shard_rows=1000,
                 progress=False)
    return out
