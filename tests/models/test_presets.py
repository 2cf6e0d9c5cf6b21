"""Parameter counts (spec §2.3, §6.2), FLOPs per token and memory estimates."""

from __future__ import annotations

import pytest
import torch

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import ConfigError
from edlm_dist.models.build import build_model, count_parameters, estimate_memory, flops_per_token

OWT_V = 50258

SPEC_COUNTS = [  # (preset, vocab, kind, count from EDLM_SPEC §2.3 / §6.2)
    ("tiny", OWT_V, "dit", 80_061_266),
    ("small", OWT_V, "dit", 169_627_218),
    ("medium", OWT_V, "dit", 424_477_010),
    ("tiny", OWT_V, "ar", 76_709_458),
    ("small", OWT_V, "ar", 162_246_482),
    ("medium", OWT_V, "ar", 405_141_586),
    ("small", 35, "dit", 92_434_467),  # text8
    ("small", OWT_V, "energy", 133_341_184),  # trainable energy net
]


def preset(name: str) -> ModelConfig:
    return load_config(None, [f"model.preset={name}"]).model


@pytest.mark.parametrize("name,vocab,kind,expected", SPEC_COUNTS)
def test_preset_counts_match_the_spec(name, vocab, kind, expected):
    cfg = preset(name)
    model = build_model(kind, cfg, vocab, 1024, meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected
    assert count_parameters(cfg, vocab, kind) == expected


def test_small_dit_breakdown_matches_the_spec():
    model = build_model("dit", preset("small"), OWT_V, 1024, meta=True)
    numel = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert numel("vocab_embed.") == 38_598_144
    assert numel("sigma_map.") == 49_408
    assert numel("blocks.0.") == 7_677_696
    assert numel("blocks.0.adaLN_modulation.") == 594_432
    assert numel("output_layer.") == 38_847_314
    assert numel("output_layer.linear.") == 38_648_402


@pytest.mark.parametrize("kind", ["dit", "ar", "energy"])
@pytest.mark.parametrize("shape", [(32, 2, 4, 16, 4), (48, 3, 6, 8, 2)])
def test_analytical_count_equals_real_model_numel(kind, shape):
    hidden, blocks, heads, cond, ratio = shape
    cfg = ModelConfig(hidden_size=hidden, n_blocks=blocks, n_heads=heads, cond_dim=cond, mlp_ratio=ratio)
    model = build_model(kind, cfg, 41, 8)  # a real (allocated, initialised) dense TP=1 model
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg, 41, kind)


def test_flops_per_token_of_small_dit():
    # Spec §2.3 breakdown: per-token matmul params = blocks without adaLN + output projection + LNs.
    per_token_params = 12 * (7_677_696 - 594_432) + 38_648_402 + 768
    expected = 6 * per_token_params + 12 * 12 * 768 * 1024
    assert flops_per_token(preset("small"), OWT_V, 1024, "dit") == expected


def test_flops_per_token_of_block_causal_small_dit():
    # Training runs the blocks on [x_t ; x0] (2 tokens per data token, 2L keys each), the output on x_t only.
    blocks, output = 12 * (7_677_696 - 594_432), 38_648_402 + 768
    expected = 6 * (2 * blocks + output) + 12 * 12 * 768 * 1024 * 4
    cfg = preset("small")
    cfg.block_size = 16
    assert flops_per_token(cfg, OWT_V, 1024, "dit") == expected
    cfg.block_size = 1024  # one block: MDLM
    assert flops_per_token(cfg, OWT_V, 1024, "dit") == flops_per_token(preset("small"), OWT_V, 1024, "dit")


def test_flops_attention_term_grows_linearly_with_length():
    cfg = preset("small")
    delta = flops_per_token(cfg, OWT_V, 2048, "ar") - flops_per_token(cfg, OWT_V, 1024, "ar")
    assert delta == 12 * 12 * 768 * 1024


def test_memory_fp32_single_gpu_is_bytes_per_param():
    cfg = preset("small")
    n = count_parameters(cfg, OWT_V, "dit")
    mem = estimate_memory(cfg, OWT_V, 1024, 8, zero_stage=0, dp=1, tp=1, precision="fp32")
    assert (mem["params"], mem["grads"], mem["optimizer"]) == (4 * n, 4 * n, 8 * n)
    bf16 = estimate_memory(cfg, OWT_V, 1024, 8, zero_stage=0, dp=1, tp=1, precision="bf16")
    assert (bf16["params"], bf16["grads"], bf16["optimizer"]) == (2 * n, 2 * n, 12 * n)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")


def test_memory_zero_stages_partition_over_dp():
    cfg = preset("small")
    args = dict(model_cfg=cfg, vocab_size=OWT_V, length=1024, micro_batch=8, dp=4, tp=1, precision="fp32")
    s0, s1, s2, s3 = (estimate_memory(zero_stage=s, **args) for s in range(4))
    assert s1["optimizer"] == s0["optimizer"] // 4 and s1["grads"] == s0["grads"]
    assert s2["grads"] == s0["grads"] // 4 and s2["params"] == s0["params"]
    assert s3["params"] == s0["params"] // 4
    assert s0["total"] > s1["total"] > s2["total"] > s3["total"]
    args["precision"] = "bf16"  # bf16 at ZeRO-0 runs as ZeRO-1 (parallel/deepspeed_engine.py)
    assert estimate_memory(zero_stage=0, **args) == estimate_memory(zero_stage=1, **args)


def test_memory_tensor_parallel_and_checkpointing_reduce_per_gpu_bytes():
    cfg = preset("small")
    one = estimate_memory(cfg, OWT_V, 1024, 8, 0, 1, 1, "bf16")
    two = estimate_memory(cfg, OWT_V, 1024, 8, 0, 1, 2, "bf16")
    assert one["params"] / 2 < two["params"] < one["params"]  # replicated LN/adaLN stay whole
    cfg.activation_checkpointing = True
    assert estimate_memory(cfg, OWT_V, 1024, 8, 0, 1, 1, "bf16")["activations"] < one["activations"]
    nce = estimate_memory(cfg, OWT_V, 1024, 8, 0, 1, 1, "bf16", kind="energy")
    assert nce["frozen_diffusion"] == 2 * count_parameters(cfg, OWT_V, "dit")


def test_bad_arguments_raise_config_errors():
    cfg = preset("tiny")
    with pytest.raises(ConfigError, match="precision"):
        estimate_memory(cfg, OWT_V, 1024, 8, 0, 1, 1, "fp16")
    with pytest.raises(ConfigError, match="zero_stage"):
        estimate_memory(cfg, OWT_V, 1024, 8, 4, 1, 1, "fp32")
    with pytest.raises(ConfigError, match="unknown"):
        count_parameters(cfg, OWT_V, "bert")
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model("dit", cfg, 1, 1024, meta=True)


def test_dtype_and_device_moves_keep_tp_attributes():
    """DeepSpeed's bf16 cast and build_model(device=...) go through Module._apply: flags must survive."""
    cfg = ModelConfig(hidden_size=32, n_blocks=1, n_heads=4, cond_dim=16)
    model = build_model("dit", cfg, 37, 8, device="cpu").to(torch.bfloat16)
    assert model.vocab_embed.weight.dtype == torch.bfloat16
    assert model.vocab_embed.weight.tensor_model_parallel is True
    assert model.blocks[0].attn_qkv.weight.partition_stride == 3
    assert not hasattr(model.blocks[0].norm1.weight, "tensor_model_parallel")
