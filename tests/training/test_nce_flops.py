"""MFU's FLOP count for NCE training against torch's FlopCounterMode on one real NCE loss step."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from edlm_dist.config.load import load_config
from edlm_dist.models.build import build_model, flops_per_token
from edlm_dist.training.objective_steps import NCEObjective

VOCAB, LENGTH, BATCH = 40, 64, 2


def nce_objective(n_negatives: int):
    cfg = load_config(None, [f"train.n_negatives={n_negatives}", "train.objective=nce"])
    m = cfg.model
    m.n_blocks, m.hidden_size, m.n_heads, m.cond_dim, m.dropout = 2, 64, 4, 16, 0.0
    torch.manual_seed(0)
    diffusion = build_model("dit", m, VOCAB, LENGTH)
    energy = build_model("energy", m, VOCAB, LENGTH)
    for p in list(diffusion.parameters()) + list(energy.parameters()):
        torch.nn.init.normal_(p, std=0.02)
    return NCEObjective(cfg, VOCAB, VOCAB - 1, 1, diffusion), energy


def measured_step_flops(objective, energy) -> int:
    """Matmul FLOPs of one forward + backward of the NCE loss. The math SDPA backend runs attention
    as matmuls, which the counter sees (it has no rule for the CPU flash kernel)."""
    x0 = torch.randint(0, VOCAB - 1, (BATCH, LENGTH))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = objective.loss(energy, x0, torch.Generator().manual_seed(1))
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("n_negatives", [1, 3])
def test_nce_flops_count_every_energy_pass_and_the_frozen_diffusion_forward(n_negatives):
    objective, energy = nce_objective(n_negatives)
    measured = measured_step_flops(objective, energy)
    counted = objective.flops_per_token(LENGTH) * BATCH * LENGTH
    # The convention leaves out the per-sequence matmuls (sigma map, adaLN, energy head): under 3 % here.
    assert counted == pytest.approx(measured, rel=0.03)
    energy_only = flops_per_token(objective.cfg.model, VOCAB, LENGTH, "energy") * BATCH * LENGTH
    assert measured > (1 + n_negatives) * energy_only  # the old count (energy once) was (1+n)x too small
