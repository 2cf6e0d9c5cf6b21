"""The sampler's speed paths change no sample (docs/frontier.md): vectorised per-stream draws, scoring each
distinct candidate of a row once, CPU chunking of model forwards, and ``skip_idle_is``.

The reference is the engine's former loop, written out here with the tested math primitives: one
``sample_categorical`` / ``ddpm_update`` / ``posterior_step_from_x0`` call per row (and per proposal), each
with a fresh generator of its stream. Tokens must match it exactly, for every precision and setting.
"""

from __future__ import annotations

import pytest
import torch

from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.categorical import sample_categorical
from edlm_dist.sampling.energies import log_mu_at_candidates
from edlm_dist.sampling.engine import SamplerSettings, sample_batch
from edlm_dist.sampling.streams import (
    STREAM_PROPOSAL,
    STREAM_RESAMPLE,
    STREAM_STEP,
    stream_categorical,
    stream_generator,
)
from edlm_dist.sampling.importance import (
    effective_sample_size,
    log_importance_weights,
    posterior_step_from_x0,
    resample_index,
)
from edlm_dist.sampling.mdlm import ddpm_update, move_chances, noise_removal, sampling_timesteps
from tests.tolerances import assert_close_across

LENGTH, MASK = 5, 4  # real tokens 0..3
MU = torch.softmax(torch.randn(LENGTH, MASK, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)


class Stub:
    """Factorised mu_theta (SUBS carry-over); records the rows of every call."""

    def __init__(self):
        self.logits = torch.cat([MU.log(), torch.zeros(LENGTH, 1, dtype=MU.dtype)], dim=-1).float()
        self.rows = 0

    def __call__(self, x_t, t):
        self.rows += x_t.shape[0]
        return subs_log_probs(self.logits.expand(x_t.shape[0], -1, -1), x_t, MASK)


def energy(x0, x_t, log_mu_tokens, t):
    """Depends on the candidate, on x_t and on log mu_theta at the candidate's tokens (like the AR energy)."""
    code = (x0 * torch.tensor([1, 3, 5, 7, 11])).sum(-1).double()
    return torch.cos(code) + 0.3 * (x_t == MASK).sum(-1) * torch.sin(code) + 0.5 * log_mu_tokens.double().sum(-1)


def reference_sample(denoiser, settings: SamplerSettings, ids: list[int]):
    """The per-row loop (redraw mode): returns (tokens, row ESS sums)."""
    batch, dtype, schedule = len(ids), settings.dtype, LogLinearSchedule()
    x = torch.full((batch, LENGTH), MASK)
    grid, dt = sampling_timesteps(settings.steps, settings.eps), (1.0 - settings.eps) / settings.steps
    use_cache = settings.update == "ddpm_cache"
    log_mu, stale, ess_sum = None, torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.float64)
    for i in range(settings.steps):
        t = float(grid[i])
        move_t, move_s = move_chances(t, t - dt, settings.update, schedule)
        run_is = settings.sampler == "edlm" and t >= 1.0 - settings.window
        if bool(stale.any()):
            rows = stale.nonzero().flatten()
            values = denoiser(x[rows], torch.full((len(rows),), t))
            if log_mu is None:
                log_mu = torch.empty((batch, *values.shape[1:]), dtype=values.dtype)
            log_mu[rows] = values
            stale[:] = False
        x0_star = None
        if run_is:
            cands = torch.empty((batch, settings.k, LENGTH), dtype=torch.long)
            for b in range(batch):
                probs = log_mu[b].to(dtype).exp()
                probs[:, MASK] = 0.0
                for j in range(settings.k):
                    g = stream_generator(x.device, settings.seed, STREAM_PROPOSAL, i, ids[b], j)
                    cands[b, j] = torch.where(x[b] != MASK, x[b], sample_categorical(probs, generator=g, dtype=dtype))
            flat = cands.reshape(-1, LENGTH)
            e = energy(flat, x.repeat_interleave(settings.k, 0), log_mu_at_candidates(log_mu, flat, settings.k), None)
            log_w = log_importance_weights(e.reshape(batch, settings.k), settings.temperature)
            ess_sum += effective_sample_size(log_w)
            x0_star = torch.stack([cands[b, int(resample_index(log_w[b : b + 1], generator=stream_generator(
                x.device, settings.seed, STREAM_RESAMPLE, i, ids[b]))[0])] for b in range(batch)])
        x_next = torch.empty_like(x)
        for b in range(batch):
            g = stream_generator(x.device, settings.seed, STREAM_STEP, i, ids[b])
            if x0_star is not None:
                x_next[b] = posterior_step_from_x0(x0_star[b : b + 1], x[b : b + 1], move_t, move_s, MASK,
                                                   generator=g)[0]
            else:
                x_next[b] = ddpm_update(log_mu[b : b + 1].to(dtype).exp(), x[b : b + 1], move_t, move_s, MASK,
                                        generator=g, dtype=dtype)[0]
        changed = (x_next != x).any(-1)
        stale |= changed if use_cache else torch.ones_like(stale)
        x = x_next
    rows = (x == MASK).any(-1).nonzero().flatten()
    if len(rows):
        x[rows] = noise_removal(denoiser(x[rows], torch.full((len(rows),), float(grid[-1]))), x[rows], MASK)
    return x, ess_sum


@pytest.mark.parametrize("sampler,update,precision,k,window,steps", [
    ("mdlm", "ddpm_cache", "float64", 1, 0.0, 12),
    ("mdlm", "ddpm", "bfloat16", 1, 0.0, 7),
    ("edlm", "ddpm_cache", "float64", 3, 0.5, 12),
    ("edlm", "ddpm_cache", "float32", 4, 1.0, 20),
    ("edlm", "ddpm", "bfloat16", 2, 0.3, 9),
])
def test_tokens_equal_the_per_row_reference(sampler, update, precision, k, window, steps):
    ids = list(range(100, 140))
    base = dict(sampler=sampler, update=update, precision=precision, k=k, window=window, steps=steps, seed=7,
                skip_idle_is=False)
    expected, ess_sum = reference_sample(Stub(), SamplerSettings(**base), ids)
    plain = sample_batch(Stub(), SamplerSettings(**base), ids, length=LENGTH, mask_id=MASK, energy_fn=energy)
    assert torch.equal(plain.tokens, expected)
    if sampler == "edlm":
        # float64 ESS sums over the steps of the batched path vs the per-row loop
        assert_close_across(plain.row_ess_sum, ess_sum, dtype=torch.float64, reduction_size=k * steps)
        skipping = sample_batch(Stub(), SamplerSettings(**{**base, "skip_idle_is": True}), ids, length=LENGTH,
                                mask_id=MASK, energy_fn=energy)
        assert torch.equal(skipping.tokens, expected)  # a step that reveals nothing ignores x0*: same samples
        assert skipping.idle_skips > 0 and skipping.energy_evaluations == plain.energy_evaluations - k * \
            skipping.idle_skips
        assert 0 < plain.energy_rows <= plain.energy_evaluations


def test_each_distinct_candidate_of_a_row_is_scored_once():
    """L = 2 over 3 real tokens: at most 9 distinct candidates per row and step, whatever k is."""
    mu = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    logits = torch.cat([mu.log(), torch.zeros(2, 1)], dim=-1)
    seen = []

    def recording(x0, x_t, log_mu_tokens, t):
        seen.append(x0.shape[0])
        return (x0[:, 0] * 3 + x0[:, 1]).double()

    def denoiser(x_t, t):
        return subs_log_probs(logits.expand(x_t.shape[0], -1, -1), x_t, 3)

    settings = SamplerSettings(sampler="edlm", steps=1, k=64, window=1.0, noise_removal=False)
    out = sample_batch(denoiser, settings, range(5), length=2, mask_id=3, energy_fn=recording)
    assert out.energy_evaluations == 5 * 64 and out.energy_rows == sum(seen) <= 5 * 9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stream_categorical_equals_one_call_per_stream(dtype):
    probs = torch.rand(3, 6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probs[:, :, 4] = 0.0  # an impossible category stays impossible
    index = torch.tensor([0, 0, 2, 1, 2])
    seeds = [11, 12, 13, 14, 15]
    expected = torch.stack([sample_categorical(probs[r], generator=torch.Generator().manual_seed(s), dtype=dtype)
                            for r, s in zip(index.tolist(), seeds)])
    assert torch.equal(stream_categorical(probs, seeds, dtype, index), expected)
    assert not bool((expected == 4).any())
