"""Every shipped config loads, fits its GPU layout, and builds the paper's model shape on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest

from edlm_dist.config.load import load_config, validate_world
from edlm_dist.models.build import build_model, count_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPT2_VOCAB, CHAR_VOCAB = 50258, 35  # spec §1.1 (mask id appended to GPT-2; MDLM's text8 ids)
# Spec §2.3: DiT parameter counts.
EXPECTED = {
    "owt_small.yaml": (169_627_218, 1024), "owt_small_8gpu.yaml": (169_627_218, 1024),
    "owt_medium.yaml": (424_477_010, 1024), "owt_medium_8gpu.yaml": (424_477_010, 1024),
    "text8_small.yaml": (92_434_467, 256), "text8_small_8gpu.yaml": (92_434_467, 256),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_preset_builds_the_paper_model(name):
    cfg = load_config(CONFIGS / name)
    params, seq_len = EXPECTED[name]
    vocab = CHAR_VOCAB if cfg.data.tokenizer == "text8" else GPT2_VOCAB
    assert cfg.data.seq_len == seq_len and cfg.train.global_batch == 512 and cfg.train.lr == 3e-4
    assert cfg.train.steps == 1_000_000 and cfg.train.ema == 0.9999
    world = cfg.slurm.nodes * cfg.slurm.gpus_per_node
    dp = validate_world(cfg, world)
    accumulation = cfg.train.global_batch // (cfg.train.micro_batch * dp)
    assert accumulation * cfg.train.micro_batch * dp == 512
    assert cfg.model.n_heads % cfg.parallel.tp == 0
    model = build_model("dit", cfg.model, vocab, seq_len, meta=True)
    assert all(p.is_meta for p in model.parameters())  # shapes only, nothing allocated
    assert sum(p.numel() for p in model.parameters()) == params == count_parameters(cfg.model, vocab, "dit")


def test_demo_config_is_cpu_sized():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert validate_world(cfg, 1) == 1
    model = build_model("dit", cfg.model, cfg.data.synthetic.num_tokens + 3, cfg.data.seq_len, meta=True)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_text_demo_config_is_cpu_sized():
    cfg = load_config(CONFIGS / "text_demo.yaml")
    assert validate_world(cfg, 1) == 1 and cfg.data.source == "pydoc" and cfg.eval.oracle == "ngram"
    model = build_model("dit", cfg.model, 110, cfg.data.seq_len, meta=True)  # ~107 characters + specials
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_every_shipped_config_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED) | {"demo.yaml", "text_demo.yaml"}
