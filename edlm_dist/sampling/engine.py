"""Sampling loops wired to models: MDLM ``ddpm``/``ddpm_cache`` and EDLM importance sampling (spec §5, §6.5).

One loop serves both samplers. Per step t -> s on the grid ``linspace(1, eps, T + 1)``:

* MDLM (and EDLM outside its window): x_s ~ q(x_s | x_t, mu_theta) (paper Eq. 5).
* EDLM inside the window t in [1 - w, 1] (paper Alg. 1): k proposals x0^(j) ~ p_theta(x0 | x_t),
  energies E_j, one index drawn with weights ∝ exp(-E_j / tau), then x_s ~ q(x_s | x_t, x0*).
  ``redraw_every_step`` (Alg. 1) draws a fresh pool at every window step; otherwise the chosen x0*
  is kept (and used, even past the window edge) until a token is revealed, as the reference code
  does with its one-hot cache (spec §6.5, §6.8 #6).

Caching: a row's mu_theta is reused while the row did not change, only for ``ddpm_cache`` and a
denoiser without time conditioning (spec §5.3); the decision is made per row, not per batch.

Randomness: every draw uses its own generator seeded from (seed, stream, step, sample id, j), so
sample i is the same whatever the batch size, the data-parallel layout, or which rank drew which
proposal (distributed ≡ single rank, docs/sampling.md). No torch.distributed here: the proposal
exchange is delegated to a ``proposals`` object (:class:`LocalProposals` or
:class:`edlm_dist.parallel.proposals.DistributedProposals`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.categorical import sample_categorical
from edlm_dist.sampling.energies import log_mu_at_candidates
from edlm_dist.sampling.importance import (
    effective_sample_size,
    log_importance_weights,
    posterior_step_from_x0,
    resample_index,
)
from edlm_dist.sampling.mdlm import UPDATES, ddpm_update, move_chances, noise_removal, sampling_timesteps

PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLERS = ("mdlm", "edlm")

# Random streams: one generator per (seed, stream, step, sample id, proposal j).
STREAM_PROPOSAL, STREAM_RESAMPLE, STREAM_STEP = 1, 2, 3

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x_t (B, L) long, t (B,) float) -> log mu_theta (B, L, V)`` with SUBS applied. An optional
attribute ``time_conditioning`` (default False) disables caching when True."""

EnergyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x0 (N, L), x_t (N, L), log_mu_tokens (N, L), t (N,)) -> energies (N,)``; see energy_fns.py."""


def stream_seed(seed: int, stream: int, step: int, sample_id: int, proposal: int = 0) -> int:
    """A 63-bit seed that depends only on its arguments (BLAKE2b of the packed tuple)."""
    packed = struct.pack("<5Q", *(int(v) & 0xFFFFFFFFFFFFFFFF for v in (seed, stream, step, sample_id, proposal)))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def stream_generator(device: torch.device, seed: int, stream: int, step: int, sample_id: int,
                     proposal: int = 0) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, stream, step, sample_id, proposal))
    return generator


def state_hash(x: torch.Tensor) -> int:
    """Exact fingerprint of a token tensor (for "x_t identical across ranks" checks and traces)."""
    return int.from_bytes(hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest(),
                          "little")


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides the samples besides the models (mirrors ``SampleConfig``)."""

    sampler: str = "mdlm"
    update: str = "ddpm_cache"
    steps: int = 32
    k: int = 2
    window: float = 0.2
    temperature: float = 1.0
    redraw_every_step: bool = True
    noise_removal: bool = True
    precision: str = "float64"
    seed: int = 1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        checks = [
            (self.sampler in SAMPLERS, f"sampler '{self.sampler}' is unknown; use one of {list(SAMPLERS)}"),
            (self.update in UPDATES, f"update '{self.update}' is unknown; use one of {list(UPDATES)}"),
            (self.steps >= 1, f"steps must be >= 1 (got {self.steps})"),
            (self.k >= 1, f"k must be >= 1 (got {self.k}): it is the number of importance-sampling proposals"),
            (0.0 <= self.window <= 1.0, f"window must be in [0, 1] (got {self.window}): IS runs for t in [1-w, 1]"),
            (self.temperature > 0, f"temperature must be > 0 (got {self.temperature})"),
            (self.precision in PRECISIONS, f"precision '{self.precision}' is unknown; use one of {list(PRECISIONS)}"),
            (0.0 < self.eps < 1.0, f"eps must be in (0, 1) (got {self.eps})"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(f"sampling setting: {message}")

    @classmethod
    def from_config(cls, sample_cfg) -> "SamplerSettings":
        names = ("sampler", "update", "steps", "k", "window", "temperature", "redraw_every_step", "noise_removal",
                 "precision", "seed")
        return cls(**{name: getattr(sample_cfg, name) for name in names})

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


class ModelDenoiser:
    """log mu_theta(x0 | x_t) from a DiT: full-vocabulary logits -> SUBS (spec §4.1), float32.

    The DiT gets sigma(t) of the log-linear schedule (as in training); it ignores it unless the
    model was trained with time conditioning.
    """

    def __init__(self, model: torch.nn.Module, mask_id: int, vocab_size: int,
                 schedule: Optional[LogLinearSchedule] = None):
        self.model, self.mask_id, self.vocab_size = model.eval(), int(mask_id), int(vocab_size)
        self.schedule = schedule or LogLinearSchedule()
        self.time_conditioning = bool(getattr(model, "time_conditioning", False))

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.schedule.total_noise(t.to(device=x_t.device, dtype=torch.float32))
        logits = self.model(x_t, sigma, gather_logits=True)[..., : self.vocab_size]
        return subs_log_probs(logits, x_t, self.mask_id)


class Proposals(Protocol):
    """Who draws which of the k proposals, and how the results are shared (see parallel/proposals.py)."""

    def owned(self, k: int) -> range: ...

    def gather(self, energies: torch.Tensor, candidates: torch.Tensor, k: int,
               x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check_in_sync(self, x: torch.Tensor, where: str) -> None: ...


class LocalProposals:
    """Single rank: this process draws all k proposals; nothing to exchange."""

    def owned(self, k: int) -> range:
        return range(k)

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
    ess_per_step: list = field(default_factory=list)  # mean ESS over the rows that ran IS, None elsewhere
    row_ess_sum: Optional[torch.Tensor] = None  # (B,) float64 sum of ESS over a row's IS steps
    row_is_steps: Optional[torch.Tensor] = None  # (B,) number of IS steps per row
    step_hashes: list = field(default_factory=list)  # state_hash(x) after every step (trace=True)

    @property
    def row_mean_ess(self) -> torch.Tensor:
        """Mean ESS per row over its IS steps (NaN for rows that never ran IS)."""
        counts = self.row_is_steps.to(torch.float64)
        return torch.where(counts > 0, self.row_ess_sum / counts.clamp_min(1), torch.full_like(counts, float("nan")))


def _importance_select(log_mu: torch.Tensor, x: torch.Tensor, rows: list[int], ids: list[int], step: int, t: float,
                       settings: SamplerSettings, energy_fn: EnergyFn, proposals: Proposals, mask_id: int):
    """Alg. 1 lines 6-10 for the given rows: proposals, energies, weights, one chosen x0* per row.

    Proposal j of a row always comes from the generator (seed, PROPOSAL, step, sample id, j), on
    whichever rank owns j, so the pool does not depend on the rank layout.
    """
    length, k, dtype, device = x.shape[1], settings.k, settings.dtype, x.device
    owned = proposals.owned(k)
    candidates = torch.empty((len(rows), len(owned), length), dtype=torch.long, device=device)
    for r, b in enumerate(rows):
        probs = log_mu[b].to(dtype).exp()
        probs[:, mask_id] = 0.0  # the mask token is never proposed
        carried = x[b] != mask_id
        for jj, j in enumerate(owned):
            generator = stream_generator(device, settings.seed, STREAM_PROPOSAL, step, ids[b], j)
            draw = sample_categorical(probs, generator=generator, dtype=dtype)
            candidates[r, jj] = torch.where(carried, x[b], draw)
    rows_t = torch.tensor(rows, device=device)
    if len(owned):
        flat = candidates.reshape(-1, length)
        x_t = x[rows_t].repeat_interleave(len(owned), dim=0)
        log_mu_tokens = log_mu_at_candidates(log_mu[rows_t], flat, len(owned))
        times = torch.full((flat.shape[0],), t, dtype=torch.float32, device=device)
        energies = energy_fn(flat, x_t, log_mu_tokens, times)
        if energies.numel() != flat.shape[0]:
            raise SamplingError(f"the energy function returned {energies.numel()} values for {flat.shape[0]} "
                                "candidates; it must return one energy per candidate row")
        energies = energies.detach().to(torch.float64).reshape(len(rows), len(owned))
    else:  # more ranks than proposals: this rank only takes part in the exchange
        energies = torch.empty((len(rows), 0), dtype=torch.float64, device=device)
    energies, candidates = proposals.gather(energies, candidates, k, x[rows_t])
    log_w = log_importance_weights(energies, settings.temperature)  # raises on NaN/Inf energies
    chosen = torch.empty((len(rows), length), dtype=torch.long, device=device)
    for r, b in enumerate(rows):
        generator = stream_generator(device, settings.seed, STREAM_RESAMPLE, step, ids[b])
        index = int(resample_index(log_w[r : r + 1], generator=generator)[0])
        chosen[r] = candidates[r, index]
    return chosen, effective_sample_size(log_w)


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
    schedule: Optional[LogLinearSchedule] = None,
    trace: bool = False,
) -> SampleBatch:
    """Sample one batch of rows (global ids ``sample_ids``) with MDLM or EDLM (module docstring).

    Args:
        x_init: start state (default all-mask); with ``step_range=(a, b)`` only grid steps a..b-1
            run (tests drive a single step this way).
        proposals: the proposal exchange (default :class:`LocalProposals`).
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
    reuse = edlm and not settings.redraw_every_step

    out = SampleBatch(tokens=x, row_ess_sum=torch.zeros(batch, dtype=torch.float64),
                      row_is_steps=torch.zeros(batch, dtype=torch.long))
    log_mu: Optional[torch.Tensor] = None
    stale = torch.ones(batch, dtype=torch.bool)  # rows whose mu_theta must be (re)computed
    has_star = torch.zeros(batch, dtype=torch.bool)  # rows holding a chosen x0* for this step
    x0_star = torch.zeros_like(x)
    for i in range(first, last):
        t = float(timesteps[i])
        move_t, move_s = move_chances(t, t - dt, settings.update, schedule)
        in_window = edlm and t >= 1.0 - settings.window
        run_is = (~has_star if reuse else torch.ones(batch, dtype=torch.bool)) & in_window
        if not reuse:
            has_star.zero_()
        need_mu = stale & ~(has_star & ~run_is)  # rows that follow a reused x0* need no denoiser call
        if bool(need_mu.any()):
            rows = need_mu.nonzero().flatten().to(device)
            x_rows = x if len(rows) == batch else x[rows]
            values = denoiser(x_rows, torch.full((len(rows),), t, dtype=torch.float32, device=device))
            if log_mu is None:
                log_mu = torch.empty((batch, *values.shape[1:]), dtype=values.dtype, device=device)
            log_mu[rows] = values
            stale &= ~need_mu
            out.nfe += 1
        if bool(run_is.any()):
            rows = run_is.nonzero().flatten().tolist()
            chosen, ess = _importance_select(log_mu, x, rows, ids, i, t, settings, energy_fn, proposals, mask_id)
            x0_star[rows] = chosen
            has_star[rows] = True
            out.energy_evaluations += len(rows) * len(proposals.owned(settings.k))
            out.row_ess_sum[rows] += ess.cpu()
            out.row_is_steps[rows] += 1
            out.ess_per_step.append(float(ess.mean()))
        else:
            out.ess_per_step.append(None)
        x_next = torch.empty_like(x)
        for b in range(batch):
            generator = stream_generator(device, settings.seed, STREAM_STEP, i, ids[b])
            if has_star[b]:  # q(x_s | x_t, x0*) (Alg. 1 line 12)
                x_next[b] = posterior_step_from_x0(x0_star[b : b + 1], x[b : b + 1], move_t, move_s, mask_id,
                                                   generator=generator)[0]
            else:  # q(x_s | x_t, mu_theta) (Eq. 5)
                x_next[b] = ddpm_update(log_mu[b : b + 1].to(dtype).exp(), x[b : b + 1], move_t, move_s, mask_id,
                                        generator=generator, dtype=dtype)[0]
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
            x[rows] = noise_removal(denoiser(x[rows], final_t), x[rows], mask_id)
            out.nfe += 1
    proposals.check_in_sync(x, "at the end of the batch")  # IS steps also check x_t inside their gather
    out.tokens = x
    return out
