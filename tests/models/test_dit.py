"""DiT and AR behaviour on one dense process: init, conditioning, masking of attention, a float64
reference written from the spec's formulas (§2.1, §2.2), activation checkpointing and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from edlm_dist.errors import ConfigError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import full_state_dict

from model_helpers import B, L, V, randomised, tiny, tokens  # noqa: E402
from tests.tolerances import assert_close_across, network_reduction_size  # noqa: E402

SIGMA_FEATURES = 256  # the sinusoidal features of sigma that the conditioning MLP reduces over


def network_n(cfg) -> int:
    return network_reduction_size(cfg, L, V)


# ------------------------------------------------------------------ float64 reference (spec §2.1)
def ref_layer_norm(x, w):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w


def ref_rotary(x):
    """Rotate pairs (x_i, x_{i+d/2}) as complex numbers by position · 10000^(-2i/d)."""
    d = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * theta[None]  # (L, d/2)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    return torch.cat([z.real, z.imag], dim=-1)


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_block(p, x, c, n_heads, causal):
    ada = None if c is None else (c @ p["adaLN_modulation.weight"].T + p["adaLN_modulation.bias"])[:, None]
    shift1, scale1, gate1, shift2, scale2, gate2 = (ada.chunk(6, dim=-1) if ada is not None
                                                    else (0.0, 0.0, 1.0, 0.0, 0.0, 1.0))
    bsz, length, dim = x.shape
    h = ref_layer_norm(x, p["norm1.weight"]) * (1 + scale1) + shift1
    q, k, v = (h @ p["attn_qkv.weight"].T).view(bsz, length, 3, n_heads, dim // n_heads).unbind(2)
    q, k = ref_rotary(q), ref_rotary(k)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dim // n_heads)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), -math.inf)
    attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(bsz, length, dim)
    x = x + gate1 * (attn @ p["attn_out.weight"].T)
    h = ref_layer_norm(x, p["norm2.weight"]) * (1 + scale2) + shift2
    mlp = ref_gelu_tanh(h @ p["mlp.0.weight"].T + p["mlp.0.bias"]) @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    return x + gate2 * mlp


def ref_dit(state, toks, sigma, cfg, *, causal=False):
    p = {k: v.double() for k, v in state.items()}
    x = p["vocab_embed.weight"][toks]
    c = None
    if not causal:
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
        feats = torch.cat([torch.cos(sigma.double()[:, None] * freqs), torch.sin(sigma.double()[:, None] * freqs)], -1)
        hidden = torch.nn.functional.silu(feats @ p["sigma_map.mlp.0.weight"].T + p["sigma_map.mlp.0.bias"])
        c = torch.nn.functional.silu(hidden @ p["sigma_map.mlp.2.weight"].T + p["sigma_map.mlp.2.bias"])
    for i in range(cfg.n_blocks):
        block = {k[len(f"blocks.{i}."):]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        x = ref_block(block, x, c, cfg.n_heads, causal)
    h = ref_layer_norm(x, p["output_layer.norm_final.weight"])
    if not causal:
        shift, scale = (c @ p["output_layer.adaLN_modulation.weight"].T + p["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, -1)
        h = h * (1 + scale) + shift
    return h @ p["output_layer.linear.weight"].T + p["output_layer.linear.bias"]


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_dit_matches_float64_reference(time_conditioning):
    cfg = tiny(time_conditioning=time_conditioning)
    model = randomised("dit", cfg)
    toks, sigma = tokens(), torch.tensor([0.3, 1.5, 4.0])
    expected = ref_dit(full_state_dict(model), toks, sigma if time_conditioning else torch.zeros(B), cfg)
    got = model(toks, sigma).double()
    assert_close_across(got, expected, dtype=torch.float32, reduction_size=network_n(cfg) + SIGMA_FEATURES)


def test_ar_matches_float64_reference():
    cfg = tiny()
    model = randomised("ar", cfg)
    toks = tokens()
    expected = ref_dit(full_state_dict(model), toks, None, cfg, causal=True)
    assert_close_across(model(toks).double(), expected, dtype=torch.float32, reduction_size=network_n(cfg))


# ------------------------------------------------------------------ behaviour at init
@pytest.mark.parametrize("kind", ["dit", "ar"])
def test_logits_are_exactly_zero_at_init(kind):
    torch.manual_seed(0)
    model = build_model(kind, tiny(time_conditioning=True), V, L)
    logits = model(tokens(), torch.rand(B)) if kind == "dit" else model(tokens())
    assert logits.shape == (B, L, V)
    assert torch.equal(logits, torch.zeros_like(logits))


def test_dit_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = build_model("dit", tiny(), V, L)
    x, c = torch.randn(B, L, 32), torch.randn(B, 16)
    cos, sin = model.rotary.cos_sin(L, x.device)
    for block in model.blocks:
        assert torch.equal(block(x, cos, sin, c), x)
    # Not trivially so: with a non-zero adaLN the same block changes x.
    with torch.no_grad():
        model.blocks[0].adaLN_modulation.bias.fill_(0.5)
    assert not torch.allclose(model.blocks[0](x, cos, sin, c), x)


def test_time_conditioning_off_ignores_sigma_and_on_uses_it():
    toks = tokens()
    off = randomised("dit", tiny(time_conditioning=False))
    assert torch.equal(off(toks, torch.full((B,), 0.1)), off(toks, torch.full((B,), 5.0)))
    assert torch.equal(off(toks, None), off(toks, torch.full((B,), 5.0)))
    on = randomised("dit", tiny(time_conditioning=True))
    assert not torch.allclose(on(toks, torch.full((B,), 0.1)), on(toks, torch.full((B,), 5.0)))
    with pytest.raises(ConfigError, match="sigma"):
        on(toks, None)


def test_ar_is_causal_and_dit_is_bidirectional():
    toks = tokens()
    changed = toks.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    ar, dit = randomised("ar", tiny()), randomised("dit", tiny())
    a, b = ar(toks), ar(changed)
    assert_close_across(a[:, :5], b[:, :5], dtype=torch.float32, reduction_size=network_n(tiny()))  # a leak: ≫
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    d, e = dit(toks), dit(changed)
    assert not torch.allclose(d[:, :5], e[:, :5])


def test_ar_log_probs_normalised_without_mask_column():
    ar, mask_id = randomised("ar", tiny()), V - 1
    logp = ar.log_probs(tokens(), mask_id)
    assert logp.shape == (B, L, V) and logp.dtype == torch.float32
    assert_close_across(logp.exp().sum(-1), torch.ones(B, L), dtype=torch.float32, reduction_size=V)
    assert (logp[..., mask_id] < -1e5).all()
    # Other columns: the log-softmax of the raw logits over V-1 tokens.
    raw = ar(tokens()).double()[..., :mask_id]
    assert_close_across(logp[..., :mask_id].double(), raw.log_softmax(-1), dtype=torch.float32, reduction_size=V)


# ------------------------------------------------------------------ training details
@pytest.mark.parametrize("kind", ["dit", "ar"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        model = randomised(kind, tiny(dropout=0.2, activation_checkpointing=checkpointing))
        model.train()
        torch.manual_seed(11)  # same dropout masks; the recompute must replay them
        logits = model(tokens(), torch.rand(B)) if kind == "dit" else model(tokens())
        (logits * torch.linspace(-1, 1, V)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_dropout_only_in_training_mode():
    model = randomised("dit", tiny(dropout=0.5))
    model.eval()
    assert torch.equal(model(tokens()), model(tokens()))
    model.train()
    assert not torch.equal(model(tokens()), model(tokens()))


def test_bf16_autocast_keeps_layernorm_and_sigma_map_in_fp32():
    model = randomised("dit", tiny(time_conditioning=True))
    x, sigma = torch.randn(B, L, 32), torch.rand(B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.sigma_map(sigma).dtype == torch.float32
        assert model.blocks[0].norm1(x).dtype == torch.float32
        logits = model(tokens(), sigma)
    assert logits.dtype == torch.bfloat16  # the matmuls did run in bf16 ...
    exact = model(tokens(), sigma)
    # ... and agree to bf16 precision: bf16 matmuls accumulate in fp32, so the bf16 error is one rounding
    # of each matmul's inputs (4 per block, plus the sigma map's and the output layer's)
    assert_close_across(logits.float(), exact, dtype=torch.bfloat16, reduction_size=4 * tiny().n_blocks + 4)


def test_bad_inputs_raise_clear_errors():
    model = randomised("dit", tiny())
    with pytest.raises(ConfigError, match="integer tensor"):
        model(torch.rand(B, L))
    with pytest.raises(ConfigError, match="kind"):
        build_model("gpt", tiny(), V, L)
    with pytest.raises(ConfigError, match="tp"):
        from edlm_dist.models.dit import check_tp_shape

        check_tp_shape(tiny(n_heads=4), 3)
