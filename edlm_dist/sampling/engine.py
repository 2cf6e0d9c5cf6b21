"""Sampling loops wired to models: MDLM ``ddpm``/``ddpm_cache`` and EDLM importance sampling (spec §5, §6.5).

One loop serves both samplers. Per step t -> s on the grid ``linspace(1, eps, T + 1)``:

* MDLM (and EDLM outside its window): x_s ~ q(x_s | x_t, mu_theta) (paper Eq. 5).
* EDLM inside the window t in [t_lo, t_hi] (paper Alg. 1 uses [1 - w, 1]): k proposals x0^(j) ~ p_theta(x0 | x_t),
  energies E_j, one index drawn with weights ∝ exp(-E_j / tau), then x_s ~ q(x_s | x_t, x0*).
  ``redraw_every_step`` (Alg. 1) draws a fresh pool at every window step; otherwise the chosen x0*
  is kept (and used, even past the window edge) until a token is revealed, as the reference code
  does with its one-hot cache (spec §6.5, §6.8 #6).

Caching: a row's mu_theta is reused while the row did not change, only for ``ddpm_cache`` and a
denoiser without time conditioning (spec §5.3); the decision is made per row, not per batch.

Speed (docs/frontier.md), none of which changes a sample: the per-row, per-proposal draws are raced in
one vectorised tensor op per chunk (each slice still filled by its own generator, so the numbers are
those of the per-call draws); identical candidates of a row are scored once; and with
``skip_idle_is`` a row whose step t -> s reveals no token (its reveal uniforms are drawn first, from
the step's own stream) skips the denoiser call and the importance sampling it would throw away.

Randomness: every draw uses its own generator seeded from (seed, stream, step, sample id, j), so
sample i is the same whatever the batch size, the data-parallel layout, or which rank drew which
proposal (distributed ≡ single rank, docs/sampling.md). No torch.distributed here: the proposal
exchange is delegated to a ``proposals`` object (:class:`LocalProposals` or
:class:`edlm_dist.parallel.proposals.DistributedProposals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.fingerprint import state_hash
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.chunking import rows_per_forward
from edlm_dist.sampling.energies import EnergyFn, log_mu_at_rows
from edlm_dist.sampling.importance import effective_sample_size, log_importance_weights, reveal_positions
from edlm_dist.sampling.mdlm import move_chances, noise_removal, reveal_probs, sampling_timesteps
from edlm_dist.sampling.settings import SamplerSettings
from edlm_dist.sampling.streams import (
    MAX_RACE_ELEMENTS,
    STREAM_PROPOSAL,
    STREAM_RESAMPLE,
    STREAM_STEP,
    fill_from_streams,
    stream_categorical,
    stream_seed,
)


def call_with_rows(fn: Callable, *args, rows: torch.Tensor):
    """``fn(*args)``, plus ``rows=rows`` for a callable that keeps per-row state (``needs_rows``)."""
    return fn(*args, rows=rows) if getattr(fn, "needs_rows", False) else fn(*args)


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x_t (B, L) long, t (B,) float) -> log mu_theta (B, L, V)`` with SUBS applied. An optional
attribute ``time_conditioning`` (default False) disables caching when True. A callable with
``needs_rows = True`` also gets ``rows=`` (the batch rows of its inputs): the block-wise sampler's views of
the models keep per-row prefix state (sampling/blocks.py)."""


class ModelDenoiser:
    """log mu_theta(x0 | x_t) from a DiT: full-vocabulary logits -> SUBS (spec §4.1), float32.

    The DiT gets sigma(t) of the log-linear schedule (as in training); it ignores it unless the
    model was trained with time conditioning.
    """

    def __init__(self, model: torch.nn.Module, mask_id: int, vocab_size: int,
                 schedule: Optional[LogLinearSchedule] = None):
        if getattr(model, "is_block_causal", False):
            raise SamplingError(f"the diffusion model is block-causal (model.block_size={model.block_size} < "
                                f"L={model.length}); a whole-row sampler would feed it noisy blocks as context, "
                                "which it was never trained on; sample it block by block (docs/block_diffusion.md)")
        self.model, self.mask_id, self.vocab_size = model.eval(), int(mask_id), int(vocab_size)
        self.schedule = schedule or LogLinearSchedule()
        self.time_conditioning = bool(getattr(model, "time_conditioning", False))

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.schedule.total_noise(t.to(device=x_t.device, dtype=torch.float32))
        rows = rows_per_forward(x_t.device, x_t.shape[1], x_t.shape[0])
        parts = [self.model(x_t[i : i + rows], sigma[i : i + rows], gather_logits=True)[..., : self.vocab_size]
                 for i in range(0, x_t.shape[0], rows)]
        return subs_log_probs(parts[0] if len(parts) == 1 else torch.cat(parts), x_t, self.mask_id)


class Proposals(Protocol):
    """Who draws which of the k proposals, and how the results are shared (see parallel/proposals.py)."""

    def owned(self, k: int) -> range: ...

    def gather(self, energies: torch.Tensor, candidates: torch.Tensor, k: int,
               x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check_in_sync(self, x: torch.Tensor, where: str) -> None: ...

    def row_owners(self, have: torch.Tensor) -> torch.Tensor: ...

    def broadcast_rows(self, owners: torch.Tensor, numel_per_row: int, pack, unpack) -> None: ...


class LocalProposals:
    """Single rank: this process draws all k proposals; nothing to exchange."""

    rank = 0

    def owned(self, k: int) -> range:
        return range(k)

    def row_owners(self, have: torch.Tensor) -> torch.Tensor:
        return torch.where(have, 0, -1)

    def broadcast_rows(self, owners, numel_per_row, pack, unpack) -> None:
        return None

    def gather(self, energies, candidates, k, x_t):
        return energies, candidates

    def check_in_sync(self, x, where) -> None:
        return None


@dataclass
class SampleBatch:
    """Output of :func:`sample_batch` for one batch of rows."""

    tokens: torch.Tensor  # (B, L)
    nfe: int = 0  # batched denoiser calls, noise removal included
    energy_evaluations: int = 0  # candidate energies computed on THIS rank
    energy_rows: int = 0  # rows sent to the energy function (identical candidates of a row count once)
    energy_calls: int = 0  # batched energy model calls (IS steps that ran a model): sequential calls, like nfe
    prefix_calls: int = 0  # block-wise: per-block prefix preparations (KV caches) of the models
    lookahead_calls: int = 0  # block_lookahead: denoiser calls run beside scoring calls (not sequential)
    lookahead_hits: int = 0  # block_lookahead: first calls of a block served by them (counted in no nfe)
    idle_skips: int = 0  # (row, step) pairs whose IS was skipped because the step revealed nothing
    ess_per_step: list = field(default_factory=list)  # mean ESS over the rows that ran IS, None elsewhere
    row_ess_sum: Optional[torch.Tensor] = None  # (B,) float64 sum of ESS over a row's IS steps
    row_is_steps: Optional[torch.Tensor] = None  # (B,) number of IS steps per row
    step_hashes: list = field(default_factory=list)  # state_hash(x) after every step (trace=True)

    def add_counts(self, part: "SampleBatch", rows: Optional[torch.Tensor] = None) -> None:
        """Add the counters of ``part`` (a block or window of these rows; ``rows``: which of them, default all)."""
        self.nfe += part.nfe
        self.energy_evaluations += part.energy_evaluations
        self.energy_rows += part.energy_rows
        self.energy_calls += part.energy_calls
        self.prefix_calls += part.prefix_calls
        self.lookahead_calls += part.lookahead_calls
        self.lookahead_hits += part.lookahead_hits
        self.idle_skips += part.idle_skips
        self.ess_per_step.extend(part.ess_per_step)
        self.step_hashes.extend(part.step_hashes)
        if part.row_ess_sum is not None:
            index = slice(None) if rows is None else rows
            self.row_ess_sum[index] += part.row_ess_sum.cpu()
            self.row_is_steps[index] += part.row_is_steps.cpu()

    @property
    def row_mean_ess(self) -> torch.Tensor:
        """Mean ESS per row over its IS steps (NaN for rows that never ran IS)."""
        counts = self.row_is_steps.to(torch.float64)
        return torch.where(counts > 0, self.row_ess_sum / counts.clamp_min(1), torch.full_like(counts, float("nan")))


def _reveal_mask(x: torch.Tensor, seeds: Sequence[int], move_t, move_s, mask_id: int) -> torch.Tensor:
    """(B, L) positions that q(x_s | x_t, x0*) reveals, with the uniforms ``importance.posterior_step_from_x0``
    would draw from each row's own generator; independent of x0*."""
    u = fill_from_streams(torch.empty(x.shape, dtype=torch.float64, device=x.device), seeds, "uniform")
    return reveal_positions(x, u, move_t, move_s, mask_id)


def _ddpm_rows(log_mu: torch.Tensor, x: torch.Tensor, move_t, move_s, seeds: Sequence[int], mask_id: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``mdlm.ddpm_update`` of each row with its own generator (q(x_s | x_t, mu_theta), Eq. 5), in row
    chunks that bound the (rows, L, V) float64 copy."""
    out = torch.empty_like(x)
    per_chunk = max(1, MAX_RACE_ELEMENTS // log_mu[0].numel())
    for start in range(0, x.shape[0], per_chunk):
        part = slice(start, min(x.shape[0], start + per_chunk))
        q = reveal_probs(log_mu[part].to(dtype).exp(), x[part], move_t, move_s, mask_id)
        draw = stream_categorical(q, seeds[part], dtype)
        out[part] = torch.where(x[part] != mask_id, x[part], draw)
    return out


def _draw_candidates(log_mu: torch.Tensor, x: torch.Tensor, rows: list[int], ids: list[int], owned: range,
                     step: int, settings: SamplerSettings, mask_id: int) -> torch.Tensor:
    """(R, |owned|, L) proposals x0^(j) ~ p_theta(x0 | x_t) (Alg. 1 line 6): the mask token is never
    proposed, unmasked positions are carried over. Proposal j of row b comes from the generator (seed,
    PROPOSAL, step, sample id, j), on whichever rank owns j, so the pool does not depend on the layout."""
    length, count, dtype = x.shape[1], len(owned), settings.dtype
    candidates = torch.empty((len(rows), count, length), dtype=torch.long, device=x.device)
    per_chunk = max(1, MAX_RACE_ELEMENTS // (log_mu[0].numel() * max(1, count)))  # rows per chunk
    for start in range(0, len(rows), per_chunk):
        part = rows[start : start + per_chunk]
        probs = log_mu[part].to(dtype).exp()
        probs[..., mask_id] = 0.0
        seeds = [stream_seed(settings.seed, STREAM_PROPOSAL, step, ids[b], j) for b in part for j in owned]
        index = torch.arange(len(part), device=x.device).repeat_interleave(count)
        draws = stream_categorical(probs, seeds, dtype, index).view(len(part), count, length)
        x_part = x[part].unsqueeze(1)
        candidates[start : start + len(part)] = torch.where(x_part != mask_id, x_part, draws)
    return candidates


def _score_unique(log_mu: torch.Tensor, x: torch.Tensor, rows: list[int], candidates: torch.Tensor, t: float,
                  energy_fn: EnergyFn) -> tuple[torch.Tensor, int]:
    """(R, k') float64 energies of the candidates, each distinct (row, x0) scored once.

    Late in sampling few positions are masked and a row's k proposals often coincide; an energy is a
    function of (x0, x_t, log mu_theta(x0 | x_t), t), all equal for equal candidates of one row.
    Returns the energies and the number of rows the energy function saw.
    """
    num_rows, count, length = candidates.shape
    device = candidates.device
    owner = torch.arange(num_rows, device=device).repeat_interleave(count)
    keyed = torch.cat([owner[:, None], candidates.reshape(-1, length)], dim=1)
    unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    rows_t = torch.tensor(rows, device=device)[unique[:, 0]]  # batch row of each unique candidate
    x0 = unique[:, 1:].contiguous()
    log_mu_tokens = log_mu_at_rows(log_mu, rows_t, x0)  # (U, L)
    times = torch.full((x0.shape[0],), t, dtype=torch.float32, device=device)
    energies = call_with_rows(energy_fn, x0, x[rows_t], log_mu_tokens, times, rows=rows_t)
    if energies.numel() != x0.shape[0]:
        raise SamplingError(f"the energy function returned {energies.numel()} values for {x0.shape[0]} "
                            "candidates; it must return one energy per candidate row")
    return energies.detach().to(torch.float64).reshape(-1)[inverse].reshape(num_rows, count), x0.shape[0]


def _importance_select(log_mu: torch.Tensor, x: torch.Tensor, rows: list[int], ids: list[int], step: int, t: float,
                       settings: SamplerSettings, energy_fn: EnergyFn, proposals: Proposals, mask_id: int):
    """Alg. 1 lines 6-10 for the given rows: proposals, energies, weights, one chosen x0* per row.

    Returns (chosen (R, L), ESS (R,), rows the energy function saw)."""
    owned = proposals.owned(settings.k)
    candidates = _draw_candidates(log_mu, x, rows, ids, owned, step, settings, mask_id)
    energy_rows = 0
    if len(owned):
        energies, energy_rows = _score_unique(log_mu, x, rows, candidates, t, energy_fn)
    else:  # more ranks than proposals: this rank only takes part in the exchange
        energies = torch.empty((len(rows), 0), dtype=torch.float64, device=x.device)
    energies, candidates = proposals.gather(energies, candidates, settings.k, x[rows])
    log_w = log_importance_weights(energies, settings.temperature)  # raises on NaN/Inf energies
    # importance.resample_index per row, each with its own (seed, RESAMPLE, step, id) generator.
    seeds = [stream_seed(settings.seed, STREAM_RESAMPLE, step, ids[b]) for b in rows]
    index = stream_categorical(log_w.to(torch.float64).exp(), seeds, torch.float64)
    chosen = candidates[torch.arange(len(rows), device=x.device), index.to(x.device)]
    return chosen, effective_sample_size(log_w), energy_rows


@torch.no_grad()
def sample_batch(
    denoiser: Denoiser,
    settings: SamplerSettings,
    sample_ids: Sequence[int],
    *,
    length: int,
    mask_id: int,
    device: torch.device | str = "cpu",
    energy_fn: Optional[EnergyFn] = None,
    proposals: Optional[Proposals] = None,
    x_init: Optional[torch.Tensor] = None,
    step_range: Optional[tuple[int, int]] = None,
    step_offset: int = 0,
    schedule: Optional[LogLinearSchedule] = None,
    trace: bool = False,
) -> SampleBatch:
    """Sample one batch of rows (global ids ``sample_ids``) with MDLM or EDLM (module docstring).

    Args:
        x_init: start state (default all-mask); with ``step_range=(a, b)`` only grid steps a..b-1
            run (tests drive a single step this way).
        proposals: the proposal exchange (default :class:`LocalProposals`).
        step_offset: added to the grid step in every random stream's seed (the block-wise sampler gives
            each block its own streams; 0 for a whole-row run).
    """
    ids = [int(i) for i in sample_ids]
    device = torch.device(device)
    if settings.sampler == "edlm" and energy_fn is None:
        raise SamplingError("sampler 'edlm' needs an energy function; pass energy_fn (AR, coAR, NCE or oracle)")
    proposals = proposals or LocalProposals()
    schedule = schedule or LogLinearSchedule()
    dtype = settings.dtype
    if x_init is None:
        x = torch.full((len(ids), length), mask_id, dtype=torch.long, device=device)
    else:
        x = x_init.to(device=device, dtype=torch.long).clone()
        if x.shape != (len(ids), length):
            raise SamplingError(f"x_init must be (B, L) = ({len(ids)}, {length}), got {tuple(x.shape)}")
    batch = len(ids)
    timesteps = sampling_timesteps(settings.steps, settings.eps)
    dt = (1.0 - settings.eps) / settings.steps
    first, last = step_range or (0, settings.steps)
    use_cache = settings.update == "ddpm_cache" and not getattr(denoiser, "time_conditioning", False)
    edlm = settings.sampler == "edlm"
    window_lo, window_hi = settings.window_bounds
    reuse = edlm and not settings.redraw_every_step
    # A reused x0* is followed until a change, so skipping would change which pool is drawn: redraw only.
    skip_idle = edlm and settings.skip_idle_is and not reuse

    out = SampleBatch(tokens=x, row_ess_sum=torch.zeros(batch, dtype=torch.float64),
                      row_is_steps=torch.zeros(batch, dtype=torch.long))
    log_mu: Optional[torch.Tensor] = None
    stale = torch.ones(batch, dtype=torch.bool)  # rows whose mu_theta must be (re)computed
    has_star = torch.zeros(batch, dtype=torch.bool)  # rows holding a chosen x0* for this step
    x0_star = torch.zeros_like(x)
    for i in range(first, last):
        t = float(timesteps[i])
        move_t, move_s = move_chances(t, t - dt, settings.update, schedule)
        in_window = edlm and window_lo <= t <= window_hi
        run_is = (~has_star if reuse else torch.ones(batch, dtype=torch.bool)) & in_window
        if not reuse:
            has_star.zero_()
        step = step_offset + i  # the random streams' step index
        step_seeds = [stream_seed(settings.seed, STREAM_STEP, step, sample_id) for sample_id in ids]
        reveal, idle = None, torch.zeros(batch, dtype=torch.bool)
        if skip_idle and bool(run_is.any()):  # x_s = x_t whatever x0* is: the IS would be thrown away
            reveal = _reveal_mask(x, step_seeds, move_t, move_s, mask_id)
            idle = run_is & ~reveal.any(dim=-1).cpu()
            run_is &= ~idle
            out.idle_skips += int(idle.sum())
        need_mu = stale & ~(has_star & ~run_is) & ~idle  # rows following x0* or idle need no denoiser call
        if bool(need_mu.any()):
            rows = need_mu.nonzero().flatten().to(device)
            x_rows = x if len(rows) == batch else x[rows]
            values = call_with_rows(denoiser, x_rows, torch.full((len(rows),), t, dtype=torch.float32, device=device),
                                    rows=rows)
            if log_mu is None:
                log_mu = torch.empty((batch, *values.shape[1:]), dtype=values.dtype, device=device)
            log_mu[rows] = values
            stale &= ~need_mu
            out.nfe += 1
        if bool(run_is.any()):
            rows = run_is.nonzero().flatten().tolist()
            chosen, ess, energy_rows = _importance_select(log_mu, x, rows, ids, step, t, settings, energy_fn,
                                                          proposals, mask_id)
            x0_star[rows] = chosen
            has_star[rows] = True
            out.energy_evaluations += len(rows) * len(proposals.owned(settings.k))
            out.energy_calls += 0 if getattr(energy_fn, "model_free", False) else 1
            out.energy_rows += energy_rows
            out.row_ess_sum[rows] += ess.cpu()
            out.row_is_steps[rows] += 1
            out.ess_per_step.append(float(ess.mean()))
        else:
            out.ess_per_step.append(None)
        # Each row's draw uses its own (seed, STEP, i, id) generator, whichever branch it takes.
        x_next = x.clone()  # idle rows: x_s = x_t
        star = has_star.nonzero().flatten().tolist()
        if star:  # q(x_s | x_t, x0*) (Alg. 1 line 12)
            revealed = reveal[star] if reveal is not None else _reveal_mask(
                x[star], [step_seeds[b] for b in star], move_t, move_s, mask_id)
            x_next[star] = torch.where(revealed, x0_star[star], x[star])
        plain = (~has_star & ~idle).nonzero().flatten().tolist()
        if plain:  # q(x_s | x_t, mu_theta) (Eq. 5)
            x_next[plain] = _ddpm_rows(log_mu[plain], x[plain], move_t, move_s, [step_seeds[b] for b in plain],
                                       mask_id, dtype)
        changed = (x_next != x).any(dim=-1).cpu()
        stale |= changed if use_cache else torch.ones_like(stale)
        has_star &= ~changed  # a revealed token invalidates the cached x0* (reference semantics)
        x = x_next
        if trace:
            out.step_hashes.append(state_hash(x))
    if settings.noise_removal:
        rows = (x == mask_id).any(dim=-1).nonzero().flatten()
        if len(rows):  # rows without masks are unchanged by the greedy step: skip their forward
            final_t = torch.full((len(rows),), float(timesteps[-1]), dtype=torch.float32, device=device)
            x = x.clone()
            x[rows] = noise_removal(call_with_rows(denoiser, x[rows], final_t, rows=rows), x[rows], mask_id)
            out.nfe += 1
    proposals.check_in_sync(x, "at the end of the batch")  # IS steps also check x_t inside their gather
    out.tokens = x
    return out
