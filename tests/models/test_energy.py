"""EDLM energy network (spec §6.2): zero at init, wiring of x_t/x_0, pooling and head, init from a DiT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edlm_dist.errors import CheckpointError
from edlm_dist.models.build import build_model

from model_helpers import B, L, V, randomised, tiny, tokens  # noqa: E402
from tests.tolerances import assert_close_across, network_reduction_size  # noqa: E402


def test_energy_is_input_independent_at_init_and_nce_gets_a_gradient():
    from edlm_dist.objectives.losses import nce_loss

    torch.manual_seed(0)
    energy = build_model("energy", tiny(), V, L)
    e_pos, e_neg = energy(tokens(1), tokens(2)), energy(tokens(1), tokens(3))
    assert e_pos.shape == (B,) and e_pos.dtype == torch.float32
    # Zero final layer: the pooled feature is 0, so every input gets the same constant energy (up to the
    # head's last matmul, whose rows MKL may compute in different micro-kernels: SSE4.2 does)
    head_n = network_reduction_size(tiny(), L, V)
    assert_close_across(e_pos, torch.full((B,), e_pos[0].item()), dtype=torch.float32, reduction_size=head_n)
    assert_close_across(e_pos, e_neg, dtype=torch.float32, reduction_size=head_n)
    nce_loss(e_pos, e_neg[:, None]).backward()
    # Not a saddle: the input-dependent path (the zero final layer) receives an NCE gradient.
    assert energy.output_layer.linear.weight.grad.abs().sum() > 0


def test_energy_matches_explicit_composition():
    """vocab_proj([Emb(x_t); Emb(x_0)]) -> blocks -> adaLN final layer -> mean over L -> MLP head."""
    cfg = tiny()
    energy = randomised("energy", cfg)
    x_t, x0 = tokens(1), tokens(2)
    p = dict(energy.named_parameters())
    emb = p["vocab_embed.weight"]
    h = torch.cat([emb[x_t], emb[x0]], -1) @ p["vocab_proj.weight"].T + p["vocab_proj.bias"]
    sig_hidden = F.silu(energy.sigma_map.sinusoid(torch.zeros(B), 256) @ p["sigma_map.mlp.0.weight"].T
                        + p["sigma_map.mlp.0.bias"])
    c = F.silu(sig_hidden @ p["sigma_map.mlp.2.weight"].T + p["sigma_map.mlp.2.bias"])
    cos, sin = energy.rotary.cos_sin(L, h.device)
    for block in energy.blocks:
        h = block(h, cos, sin, c)
    shift, scale = (c @ p["output_layer.adaLN_modulation.weight"].T + p["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, -1)
    h = F.layer_norm(h, (32,), eps=1e-5) * p["output_layer.norm_final.weight"] * (1 + scale) + shift
    h = h @ p["output_layer.linear.weight"].T + p["output_layer.linear.bias"]
    pooled = h.mean(dim=1)
    expected = F.relu(pooled @ p["energy_head.0.weight"].T + p["energy_head.0.bias"]) @ p["energy_head.2.weight"].T
    # the model's own input projection and pooling vs this composition: other kernels, same math
    assert_close_across(energy(x_t, x0), expected.squeeze(-1), dtype=torch.float32,
                        reduction_size=network_reduction_size(cfg, L, V) + 2 * cfg.hidden_size + 256)


def test_energy_depends_on_both_inputs_and_every_position():
    energy = randomised("energy", tiny())
    x_t, x0 = tokens(1), tokens(2)
    base = energy(x_t, x0)
    for which in ("x_t", "x0"):
        for pos in (0, L - 1):
            a, b = x_t.clone(), x0.clone()
            target = a if which == "x_t" else b
            target[:, pos] = (target[:, pos] + 1) % V
            assert not torch.allclose(energy(a, b), base), (which, pos)


def test_init_from_diffusion_copies_the_trunk_only():
    dit = randomised("dit", tiny(), seed=3)
    torch.manual_seed(4)
    energy = build_model("energy", tiny(), V, L)
    before = {n: p.clone() for n, p in energy.named_parameters()}
    energy.init_from_diffusion(dit.state_dict())
    theirs = dict(dit.named_parameters())
    trunk = [n for n, _ in energy.named_parameters() if n.startswith(("vocab_embed.", "sigma_map.", "blocks."))]
    assert len(trunk) == 1 + 4 + 2 * 10  # embedding, sigma MLP, 10 tensors per block
    for name, param in energy.named_parameters():
        if name in trunk:
            assert torch.equal(param, theirs[name]), name
        else:
            assert torch.equal(param, before[name]), name
    # Still input-independent: its own final layer is new and zero-initialised.
    assert torch.equal(energy(tokens(1), tokens(2)), energy(tokens(3), tokens(4)))


def test_init_from_diffusion_rejects_mismatched_checkpoints():
    energy = build_model("energy", tiny(), V, L)
    state = randomised("dit", tiny()).state_dict()
    del state["blocks.1.attn_qkv.weight"]
    with pytest.raises(CheckpointError, match="lacks 'blocks.1.attn_qkv.weight'"):
        energy.init_from_diffusion(state)
    other_vocab = build_model("dit", tiny(), V + 5, L).state_dict()
    with pytest.raises(CheckpointError, match="vocab_embed.weight"):
        energy.init_from_diffusion(other_vocab)


def test_energy_rejects_mismatched_shapes():
    energy = build_model("energy", tiny(), V, L)
    with pytest.raises(ValueError, match="same shape"):
        energy(tokens(1), tokens(2)[:, :4])
