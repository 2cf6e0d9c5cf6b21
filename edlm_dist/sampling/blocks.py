"""Block-wise MDLM / EDLM: commit the row b positions at a time, left to right (docs/sampling.md, "Block-wise").

Block j covers positions [lo, hi) = [j b, min((j + 1) b, L)). Before it runs, positions < lo are committed
(clean) and positions >= hi are still masked. Inside the block, :func:`edlm_dist.sampling.engine.sample_batch`
runs its whole loop (T grid steps from t = 1 to eps, the IS window on that local time, noise removal) on
the block's columns only, through two views of the models:

* the denoiser sees the full row [prefix, block, masks] (a bidirectional DiT: L tokens per call) and returns
  log mu_theta for the block's columns; a denoiser with a ``prefix_session`` (a prefix-cached, block-causal
  one) is asked for the block directly;
* the energy of a proposal is a function of prefix + block. A model with ``prefix_session(batch, length)``
  (AR, coAR, the oracle: sampling/prefix_energies.py) keeps per-batch prefix state: its ``block(x, lo, hi,
  rows)`` runs once per block (for the AR energies: the newly committed tokens join the prefix's KV cache)
  and returns the scorer that all k proposals of every step of the block share; any other energy
  callable sees the full row with the future still masked.

The k proposals of an IS step therefore share the committed prefix and differ only in the block. With
the exact energy the chosen x0* of a block step is distributed as p(x_block | prefix, x_t's revealed
block tokens) as k -> infinity, so the committed row follows p exactly, block by block, whatever T
(derivation and enumeration tests: docs/sampling.md, tests/sampling/test_blocks.py).

One block of the whole row (b = L) is today's sampler: the views then pass the row through unchanged, and
the random streams are the same (block j's streams use steps j T .. j T + T - 1), so the samples are
identical bit for bit (tested). Positions that ``x_init`` already holds (prompts, infilling templates) are
fixed; a block with nothing left to generate in a row is skipped for that row.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.sampling.engine import Proposals, SampleBatch, SamplerSettings, sample_batch
from edlm_dist.sampling.mdlm import sampling_timesteps


def block_spans(length: int, block_size: int) -> list[tuple[int, int]]:
    """[(lo, hi)] of the blocks of a row of ``length`` positions, left to right; the last may be shorter."""
    if not 1 <= block_size <= length:
        raise SamplingError(f"block_size must be in [1, L={length}] (got {block_size}); 0 in the settings means "
                            "one block of the whole row")
    return [(lo, min(length, lo + block_size)) for lo in range(0, length, block_size)]


def full_rows(prefix: torch.Tensor, block: torch.Tensor, length: int, mask_id: int) -> torch.Tensor:
    """[prefix, block, mask ... mask] as (R, length) rows: the state a whole-row model sees."""
    rows = torch.full((block.shape[0], length), mask_id, dtype=block.dtype, device=block.device)
    lo = prefix.shape[1]
    rows[:, :lo] = prefix
    rows[:, lo:lo + block.shape[1]] = block
    return rows


class BlockDenoiser:
    """log mu_theta of block [lo, hi) from a whole-row denoiser, for rows whose committed prefix is ``prefix``."""

    needs_rows = True

    def __init__(self, denoiser: Callable, prefix: torch.Tensor, hi: int, length: int, mask_id: int):
        self.denoiser, self.prefix, self.hi, self.length, self.mask_id = denoiser, prefix, hi, length, mask_id
        self.lo = prefix.shape[1]
        self.time_conditioning = bool(getattr(denoiser, "time_conditioning", False))

    def __call__(self, x_block: torch.Tensor, t: torch.Tensor, *, rows: torch.Tensor) -> torch.Tensor:
        full = full_rows(self.prefix[rows.to(self.prefix.device)], x_block, self.length, self.mask_id)
        return self.denoiser(full, t)[:, self.lo:self.hi]


class _FullRowEnergy:
    """Any ``EnergyFn`` on block proposals: it sees [prefix, block, masks] and log mu_theta 0 outside the block."""

    needs_rows = True

    def __init__(self, energy_fn: Callable, prefix: torch.Tensor, length: int, mask_id: int):
        self.energy_fn, self.prefix, self.length, self.mask_id = energy_fn, prefix, length, mask_id

    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        prefix = self.prefix[rows.to(self.prefix.device)]
        padded_mu = full_rows(torch.zeros_like(prefix, dtype=log_mu_tokens.dtype), log_mu_tokens, self.length, 0)
        return self.energy_fn(full_rows(prefix, x0, self.length, self.mask_id),
                              full_rows(prefix, x_t, self.length, self.mask_id), padded_mu, t)


class _WholeRowSession:
    """The prefix session of a model without one: every block sees whole rows (no state, no calls)."""

    calls = 0

    def __init__(self, model: Callable, view: type, length: int, mask_id: int):
        self.model, self.view, self.length, self.mask_id = model, view, length, mask_id

    def block(self, x: torch.Tensor, lo: int, hi: int, todo: torch.Tensor):
        prefix = x[todo, :lo]
        if self.view is BlockDenoiser:
            return BlockDenoiser(self.model, prefix, hi, self.length, self.mask_id)
        return _FullRowEnergy(self.model, prefix, self.length, self.mask_id)


def prefix_session(model: Callable, view: type, batch: int, length: int, mask_id: int, **kwargs):
    """``model.prefix_session(batch, length, **kwargs)`` when the model keeps prefix state, else whole rows.
    An energy's session also gets ``exchange``, the proposal group (its ranks share committed blocks); a
    denoiser's runs replicated on every rank of the group, like its calls."""
    if hasattr(model, "prefix_session"):
        return model.prefix_session(batch, length, **kwargs)
    return _WholeRowSession(model, view, length, mask_id)


class ScoreWithLookahead:
    """A block's energy view that, at the block's last grid step, also runs the next block's first denoiser call
    for each scored proposal (``block_lookahead``; sampling/lookahead.py). The two calls need nothing from each
    other: one round of latency. The energies are the view's own."""

    needs_rows = True

    def __init__(self, energy: Callable, denoiser_session, x: torch.Tensor, span: tuple[int, int],
                 next_span: tuple[int, int], todo: torch.Tensor, last_t: float):
        self.energy, self.denoiser_session, self.x = energy, denoiser_session, x
        self.span, self.next_span, self.todo, self.last_t = span, next_span, todo, last_t
        self.model_free = bool(getattr(energy, "model_free", False))

    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        if abs(float(t[0]) - self.last_t) >= 1e-6:  # not the block's last step: its proposal is not committed whole
            return self.energy(x0, x_t, log_mu_tokens, t, rows=rows)
        batch_rows = self.todo.to(x0.device)[rows]
        if not x0.is_cuda:  # one after the other: a CPU runs them on the same cores anyway
            self.denoiser_session.speculate(self.x, self.span, self.next_span, x0, batch_rows)
            return self.energy(x0, x_t, log_mu_tokens, t, rows=rows)
        # On a GPU the lookahead's kernels go to a side stream, queued before the energy's (whose scorer syncs the
        # host), so the two calls overlap; the main stream waits for it before anything reads its outputs. The side
        # stream first waits for the main one, so memory the main stream freed is never reused under it.
        main, side = torch.cuda.current_stream(x0.device), torch.cuda.Stream(device=x0.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.denoiser_session.speculate(self.x, self.span, self.next_span, x0, batch_rows)
        energies = self.energy(x0, x_t, log_mu_tokens, t, rows=rows)
        main.wait_stream(side)
        return energies


class FirstTokenFromEnergy:
    """A block's denoiser view whose proposal for the block's first position, while masked, is the energy's own
    conditional log p_AR(x^lo | prefix) (``block_proposal=ar_first``; docs/sampling.md). The importance weights
    use the same log-probabilities, so the target is unchanged; only the proposal improves."""

    needs_rows = True

    def __init__(self, view: Callable, log_probs: torch.Tensor, mask_id: int):
        self.view, self.mask_id = view, mask_id
        self.log_probs = log_probs.index_fill(-1, torch.tensor([mask_id], device=log_probs.device), float("-inf"))
        self.time_conditioning = bool(getattr(view, "time_conditioning", False))

    def __call__(self, x_block: torch.Tensor, t: torch.Tensor, *, rows: torch.Tensor) -> torch.Tensor:
        log_mu = self.view(x_block, t, rows=rows).clone()
        masked = (x_block[:, 0] == self.mask_id).to(log_mu.device)
        first = self.log_probs[rows.to(self.log_probs.device)].to(log_mu.dtype)
        log_mu[:, 0] = torch.where(masked[:, None], first, log_mu[:, 0])
        return log_mu


@torch.no_grad()
def sample_blocks(
    denoiser: Callable,
    settings: SamplerSettings,
    sample_ids: Sequence[int],
    *,
    length: int,
    mask_id: int,
    device: torch.device | str = "cpu",
    energy_fn: Optional[Callable] = None,
    proposals: Optional[Proposals] = None,
    x_init: Optional[torch.Tensor] = None,
    schedule: Optional[LogLinearSchedule] = None,
    trace: bool = False,
) -> SampleBatch:
    """Sample one batch of rows block by block (module docstring); ``settings.steps`` grid steps per block.

    Returns the rows and the counters summed over blocks (``nfe`` and ``energy_calls`` are the sequential
    model calls; ``prefix_calls`` the per-block prefix preparations)."""
    ids = [int(i) for i in sample_ids]
    device = torch.device(device)
    spans = block_spans(length, settings.block_size or length)
    x = (torch.full((len(ids), length), mask_id, dtype=torch.long, device=device) if x_init is None
         else x_init.to(device=device, dtype=torch.long).clone())
    if x.shape != (len(ids), length):
        raise SamplingError(f"x_init must be (B, L) = ({len(ids)}, {length}), got {tuple(x.shape)}")
    total = SampleBatch(tokens=x, row_ess_sum=torch.zeros(len(ids), dtype=torch.float64),
                        row_is_steps=torch.zeros(len(ids), dtype=torch.long))
    sessions = [prefix_session(denoiser, BlockDenoiser, len(ids), length, mask_id)]
    if energy_fn is not None:
        sessions.append(prefix_session(energy_fn, _FullRowEnergy, len(ids), length, mask_id, exchange=proposals))
    lookahead = getattr(sessions[0], "lookahead", None) if settings.block_lookahead else None
    if settings.block_lookahead:
        _check_lookahead(lookahead, settings, proposals)
    last_t = float(sampling_timesteps(settings.steps, settings.eps)[settings.steps - 1])
    for j, (lo, hi) in enumerate(spans):
        todo = (x[:, lo:hi] == mask_id).any(dim=-1).nonzero().flatten()
        if len(todo) == 0:  # every row already holds this block (a prompt): nothing to generate
            continue
        views = [session.block(x, lo, hi, todo) for session in sessions]
        view, energy = views[0], (views[1] if energy_fn is not None else None)
        if lookahead is not None and j + 1 < len(spans):
            energy = ScoreWithLookahead(energy, sessions[0], x, (lo, hi), spans[j + 1], todo, last_t)
        if settings.sampler == "edlm" and settings.block_proposal == "ar_first":
            first = getattr(sessions[-1], "first_token_log_probs", lambda lo, todo: None)(lo, todo)
            if first is not None:
                view = FirstTokenFromEnergy(view, first, mask_id)
        part = sample_batch(view, settings, [ids[r] for r in todo.tolist()], length=hi - lo, mask_id=mask_id,
                            device=device, energy_fn=energy, proposals=proposals, x_init=x[todo, lo:hi],
                            schedule=schedule, trace=trace, step_offset=j * settings.steps)
        x[todo, lo:hi] = part.tokens
        total.add_counts(part, todo.cpu())
    total.prefix_calls = sum(session.calls for session in sessions)
    if energy_fn is not None and hasattr(sessions[1], "score_calls"):  # the scoring calls that ran a model
        total.energy_calls = sessions[1].score_calls
    if lookahead is not None:  # served first calls made no call; lookahead calls share the scoring rounds
        total.nfe -= lookahead.hits
        total.lookahead_calls, total.lookahead_hits = lookahead.calls, lookahead.hits
        if not total.energy_calls:  # a model-free energy: nothing runs beside the lookahead, its own round
            total.nfe += lookahead.calls
    if proposals is not None:
        proposals.check_in_sync(x, "at the end of the block-wise batch")
    total.tokens = x
    return total


def _check_lookahead(lookahead, settings: SamplerSettings, proposals: Optional[Proposals]) -> None:
    if lookahead is None:
        raise SamplingError("sample.block_lookahead needs a block-causal denoiser (a model trained with "
                            "model.block_size < seq_len: its prefix KV cache); set block_lookahead=false for this model")
    if proposals is not None and len(proposals.owned(settings.k)) != settings.k:
        raise SamplingError("sample.block_lookahead needs all k proposals on one rank (the chosen proposal's "
                            "lookahead must be local); set sample.proposal_parallel=1 or block_lookahead=false")


def sample_rows(denoiser: Callable, settings: SamplerSettings, sample_ids: Sequence[int], *, length: int,
                **kwargs) -> SampleBatch:
    """Whole-row sampling (``block_size`` 0 or L) or block-wise sampling: what ``edlm sample`` runs."""
    if settings.block_size in (0, length):
        if settings.block_lookahead:
            raise SamplingError(f"sample.block_lookahead needs blocks smaller than the row (block_size={settings.block_size}, "
                                f"L={length}): there is no next block to look ahead to; set block_lookahead=false")
        return sample_batch(denoiser, settings, sample_ids, length=length, **kwargs)
    return sample_blocks(denoiser, settings, sample_ids, length=length, **kwargs)
