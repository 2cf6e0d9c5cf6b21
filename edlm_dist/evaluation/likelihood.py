"""Validation likelihood of MDLM, AR and EDLM, distributed over data-parallel ranks (spec §4.4, §6.6, §7.4).

Per validation row (docs/likelihood_bounds.md says what each number estimates or bounds):

* ``ar``         exact NLL Σ_{i≥1} −log p_AR(x^i | x^{<i}) over the L−1 predicted tokens (spec §4.3).
* ``mdlm``       one (t, mask) Monte-Carlo term of the NELBO, divided by all L tokens (spec §4.2). For a
                 block-causal denoiser (model.block_size b < L) the block-diffusion NELBO: one time per
                 (row, block), each block denoised against the clean blocks before it (BD3-LM;
                 docs/likelihood_bounds.md §5). The EDLM terms below need one time per row and are not
                 computed for such a denoiser.
* ``edlm_coar``  Eq. 13 with the carry-over AR energy and log Z = 0 (the reference's path). For a fixed
                 (t, mask) the diffusion terms cancel exactly:
                     row = (1/t) [ Σ_{i≥1, x_t^i=m} −log p_AR(x_0^i|x_0^{<i}) − 1(x_t^0=m)·log μθ(x_0^0|x_t) ],
                 so E_mask[row | t] = (1−ε)·[NLL_AR(row) + E(−log μθ(x_0^0|x_t) | x_t^0 = m)] for every t:
                 EDLM-coAR *is* the AR likelihood times (1−ε)(L−1)/L per token (spec §6.6), plus the
                 diffusion model's NLL of the first token (≈ 0 once it has learned the BOS framing).
* Position 0. The AR model never predicts x^0, so Eq. 9 taken literally leaves x^0 with no factor at
  all when x_t^0 is masked: pθ·e^{−E} is then flat in x^0 and Z(x_t) counts the vocabulary. We let
  pθ keep position 0 (the AR energies omit its log μθ term), which makes the coAR model exactly
  normalised (Z = 1 for every mask) and the EDLM-AR Z(x_t) = Σ_{x^0} μθ(x^0|x_t)·P_AR(unmasked | x^0) ≤ 1.
* ``edlm_ar`` / ``edlm_nce``  Eq. 13 with the AR energy without carry-over / the NCE energy, and
                 log Z(x_t) from n negatives x^(j) ~ pθ(·|x_t) by Theorem 1: ``upper``, ``lower`` and the
                 released code's one-sample ``plugin`` (bounds.log_partition_estimates). Both energies
                 share the same negatives (paired comparison). These estimate the Eq.-13 objective,
                 which uses the joint likelihood and is not a bound on the NLL in general (spec §6.6).

Noise is drawn from one generator per *global* row index (seeded by ``eval.seed`` and the row), and
the antithetic time strata follow the global row index, so the result does not depend on the number
of ranks, the batch size or the order in which rows are visited. Sums are float64 (value, weight)
pairs all-reduced over the DP group; TP peers see the same rows and the same noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from edlm_dist.errors import DataError
from edlm_dist.evaluation.bounds import edlm_row_nelbo, importance_ess, log_partition_estimates, mdlm_nelbo_row
from edlm_dist.sampling.categorical import sample_nce_negatives
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.objectives.subs import gather_token_log_probs, subs_log_probs
from edlm_dist.sampling.energies import EnergyFn, ar_energy, log_mu_at_candidates

F64 = torch.float64
ESTIMATES = ("upper", "lower", "plugin")


@dataclass(frozen=True)
class LikelihoodSettings:
    """Noise and estimator settings; every number in the output is a function of these and the rows."""

    n_negatives: int = 16  # Theorem-1 negatives per row
    seed: int = 1
    strata: int = 16  # antithetic strata of t over consecutive global rows (spec §3; MDLM: the micro-batch)
    sampling_eps: float = 1e-3  # t ~ U[sampling_eps, 1)
    schedule_eps: float = 1e-3  # mask probability (1 − ε)·t
    negatives_dtype: str = "float64"  # precision of the categorical race for the negatives (spec §6.7)
    chunk_rows: int = 64  # rows per model call for the n·B negatives

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LikelihoodModels:
    """The models to evaluate (any may be None); all share the vocabulary, mask id and row length."""

    vocab_size: int
    seq_len: int
    mask_id: int
    diffusion: Optional[torch.nn.Module] = None  # DiT: MDLM, and pθ of every EDLM variant
    ar: Optional[torch.nn.Module] = None  # ARTransformer: AR, EDLM-coAR, EDLM-AR
    energy: Optional[torch.nn.Module] = None  # EnergyModel: EDLM-NCE

    def block_size(self) -> int:
        """The diffusion model's block size (L for MDLM, or when there is no diffusion model)."""
        return int(getattr(self.diffusion, "block_size", self.seq_len) or self.seq_len)

    def methods(self) -> list[str]:
        out = ["ar"] if self.ar is not None else []
        if self.diffusion is not None:
            out.append("mdlm")
            if self.block_size() < self.seq_len:  # EDLM's Eq. 13 is written for one time per row
                return out
            if self.ar is not None:
                out += ["edlm_coar", "edlm_ar"]
            if self.energy is not None:
                out.append("edlm_nce")
        return out

    def device(self) -> torch.device:
        model = self.diffusion or self.ar or self.energy
        if model is None:
            raise DataError("no model to evaluate; set eval.diffusion_ckpt and/or eval.ar_ckpt")
        return next(model.parameters()).device


class RowNoise(NamedTuple):
    t: Tensor  # (B,) float64, or (B, L) with one time per block (block diffusion)
    x_t: Tensor  # (B, L)
    generators: list  # one per row, positioned after t and the mask draws


def row_generator(seed: int, row: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of global row ``row``: independent streams for every (seed, row) pair."""
    hi, lo = np.random.SeedSequence([int(seed), int(row)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed((int(hi) << 31) ^ int(lo))


def draw_row_noise(x0: Tensor, row_ids: Tensor, settings: LikelihoodSettings, mask_id: int,
                   block_size: Optional[int] = None) -> RowNoise:
    """t (stratified by global row index) and x_t ~ q(x_t|x_0) with mask probability (1−ε)t (spec §3).

    ``block_size`` b < L: one time per (row, block), stratified by the global (row, block) index, repeated
    over the block (t of shape (B, L)); b = L draws exactly the numbers of the one-time-per-row case.
    """
    schedule = LogLinearSchedule(settings.schedule_eps)
    length = x0.shape[1]
    blocks = 1 if block_size is None or block_size >= length else -(-length // block_size)
    gens = [row_generator(settings.seed, r, x0.device) for r in row_ids.tolist()]
    u = torch.stack([torch.rand(blocks, generator=g, dtype=F64, device=x0.device) for g in gens])
    index = row_ids.to(x0.device)[:, None] * blocks + torch.arange(blocks, device=x0.device)
    t = (1.0 - settings.sampling_eps) * (u + (index % settings.strata).to(F64)) / settings.strata + settings.sampling_eps
    t = t[:, 0] if blocks == 1 else t.repeat_interleave(block_size, dim=1)[:, :length]
    uniforms = torch.stack([torch.rand(length, generator=g, dtype=F64, device=x0.device) for g in gens])
    masked = uniforms < schedule.move_chance(t if t.dim() == 2 else t[:, None])
    return RowNoise(t, torch.where(masked, torch.full_like(x0, mask_id), x0), gens)


def _chunked(fn: Callable[..., Tensor], chunk: int, *tensors: Tensor) -> Tensor:
    n = tensors[0].shape[0]
    return torch.cat([fn(*(x[i:i + chunk] for x in tensors)) for i in range(0, n, max(chunk, 1))])


def diffusion_log_mu(diffusion: torch.nn.Module, x_t: Tensor, t: Tensor, vocab_size: int, mask_id: int,
                     schedule_eps: float = 1e-3, x0: Optional[Tensor] = None) -> Tensor:
    """log μθ(·|x_t) with SUBS (spec §4.1), (B, L, V) float32; sigma(t) is passed for time-conditioned models.

    With per-block times (t of shape (B, L)) the denoiser is block-causal and gets the clean rows ``x0``:
    every block is denoised against the clean blocks before it, in one two-stream forward.
    """
    if t.dim() == 2:
        logits = diffusion(x_t, None, x0=x0, gather_logits=True)[..., :vocab_size]
        return subs_log_probs(logits, x_t, mask_id)
    sigma = LogLinearSchedule(schedule_eps).total_noise(t).float()
    logits = diffusion(x_t, sigma, gather_logits=True)[..., :vocab_size]
    return subs_log_probs(logits, x_t, mask_id)


def ar_token_log_probs(ar: torch.nn.Module, tokens: Tensor, mask_id: int, chunk_rows: int = 64) -> Tensor:
    """(N, L) float64: column i ≥ 1 holds log p_AR(x^i | x^{<i}), column 0 is 0 (never scored, spec §4.3)."""

    def one(rows: Tensor) -> Tensor:
        log_probs = ar.log_probs(rows, mask_id)[:, :-1]  # position i predicts i+1
        scored = log_probs.gather(-1, rows[:, 1:, None]).squeeze(-1).to(F64)
        return torch.cat([torch.zeros_like(scored[:, :1]), scored], dim=1)

    return _chunked(one, chunk_rows, tokens)


def without_position0(log_mu_tokens: Tensor) -> Tensor:
    """log μθ at the tokens with column 0 zeroed: position 0 stays with pθ in the AR energies (module docstring)."""
    out = log_mu_tokens.clone()
    out[:, 0] = 0.0
    return out


def ar_energy_fn(ar: torch.nn.Module, mask_id: int, *, carry_over: bool, chunk_rows: int = 64) -> EnergyFn:
    """E(x, x_t) = −Σ_{i≥1} AR part + Σ_{i≥1} log μθ(x^i|x_t) (paper Eq. 9, spec §6.3), float64."""

    def energy(candidates: Tensor, x_t: Tensor, log_mu_tokens: Tensor, t: Tensor) -> Tensor:
        log_p_ar = ar_token_log_probs(ar, candidates, mask_id, chunk_rows)
        return ar_energy(log_p_ar, without_position0(log_mu_tokens), x_t, mask_id, carry_over=carry_over)

    return energy


def nce_energy_fn(energy_model: torch.nn.Module, chunk_rows: int = 64) -> EnergyFn:
    """E_φ(x_t, x) of the trained NCE energy network (spec §6.2), called like in training (no sigma)."""

    def energy(candidates: Tensor, x_t: Tensor, log_mu_tokens: Tensor, t: Tensor) -> Tensor:
        return _chunked(lambda a, b: energy_model(a, b).to(F64), chunk_rows, x_t, candidates)

    return energy


def draw_negatives(log_mu: Tensor, n: int, generators: list, dtype: str = "float64") -> Tensor:
    """n negatives per row from pθ(·|x_t) = Π_i μθ(·|x_t)_i with each row's own generator -> (B, n, L)."""
    race_dtype = getattr(torch, dtype)
    return torch.cat([sample_nce_negatives(log_mu[b:b + 1], n, generator=g, dtype=race_dtype)
                      for b, g in enumerate(generators)])


def theorem1_estimates(energy_fn: EnergyFn, x_t: Tensor, log_mu: Tensor, negatives: Tensor,
                       t: Optional[Tensor] = None):
    """Theorem-1 estimates of log Z(x_t) from (B, n, L) negatives, and the ESS of their weights.

    ``t`` (B,) is handed to the energy per negative; without it the energy gets NaN times (fine for the
    energies here, which do not use t; a time-conditioned one would then fail loudly on NaN energies)."""
    batch, n, length = negatives.shape
    flat = negatives.reshape(batch * n, length)  # batch-major: row b*n + j
    log_mu_neg = log_mu_at_candidates(log_mu, flat, n).to(F64)
    times = (t if t is not None else torch.full((batch,), float("nan"), device=flat.device)).repeat_interleave(n)
    neg_energies = -energy_fn(flat, x_t.repeat_interleave(n, dim=0), log_mu_neg, times).view(batch, n)
    return log_partition_estimates(neg_energies), importance_ess(neg_energies)


def likelihood_batch_terms(models: LikelihoodModels, x0: Tensor, row_ids: Tensor,
                           settings: LikelihoodSettings) -> dict[str, tuple[Tensor, float]]:
    """Per-row float64 terms ``key -> (values (B,), weight per row)`` of every available method, with
    the noise of the global rows ``row_ids`` (see :func:`likelihood_terms`)."""
    noise = draw_row_noise(x0, row_ids, settings, models.mask_id, models.block_size())
    return likelihood_terms(models, x0, noise, settings)


@torch.no_grad()
def likelihood_terms(models: LikelihoodModels, x0: Tensor, noise: RowNoise,
                     settings: LikelihoodSettings) -> dict[str, tuple[Tensor, float]]:
    """Per-row terms for given (t, x_t) and per-row generators (used for the negatives).

    Values are nats per row (the NLL sum; value_sum / weight_sum is nats per token); keys
    ``<method>.log_z.*`` and ``<method>.ess`` are per-row diagnostics with weight 1.
    """
    length, mask_id = x0.shape[1], models.mask_id
    out: dict[str, tuple[Tensor, float]] = {}
    log_p_ar = None
    if models.ar is not None:
        log_p_ar = ar_token_log_probs(models.ar, x0, mask_id, settings.chunk_rows)
        out["ar"] = (-log_p_ar[:, 1:].sum(-1), float(length - 1))
    if models.diffusion is None:
        return out
    t, x_t = noise.t, noise.x_t
    masked = x_t == mask_id
    log_mu = diffusion_log_mu(models.diffusion, x_t, t, models.vocab_size, mask_id, settings.schedule_eps, x0=x0)
    log_mu_x0 = gather_token_log_probs(log_mu, x0).to(F64)  # 0 at carried-over positions
    log_p_theta = torch.where(masked, log_mu_x0, torch.zeros_like(log_mu_x0)).sum(-1)
    out["mdlm"] = (mdlm_nelbo_row(log_mu_x0, masked, t, None, length) * length, float(length))
    if t.dim() == 2:  # block diffusion: no EDLM terms (methods())
        return out

    def eq13(energy_pos: Tensor, log_z: Tensor) -> Tensor:
        return edlm_row_nelbo(log_p_theta, energy_pos, log_z, t, None, length) * length

    energies: dict[str, tuple[EnergyFn, Tensor]] = {}
    if models.ar is not None:
        mu_energy_part = without_position0(log_mu_x0)
        e_coar = ar_energy(log_p_ar, mu_energy_part, x_t, mask_id, carry_over=True)
        out["edlm_coar"] = (eq13(e_coar, torch.zeros_like(e_coar)), float(length))
        # The first token's share of the coAR row (pθ's, see module docstring), reported separately.
        out["edlm_coar.position0"] = (-torch.where(masked[:, 0], log_mu_x0[:, 0], torch.zeros_like(t)) / t,
                                      float(length))
        ar_fn = ar_energy_fn(models.ar, mask_id, carry_over=False, chunk_rows=settings.chunk_rows)
        energies["edlm_ar"] = (ar_fn, ar_energy(log_p_ar, mu_energy_part, x_t, mask_id, carry_over=False))
    if models.energy is not None:
        nce_fn = nce_energy_fn(models.energy, settings.chunk_rows)
        energies["edlm_nce"] = (nce_fn, nce_fn(x0, x_t, log_mu_x0, t))
    if energies:
        negatives = draw_negatives(log_mu, settings.n_negatives, noise.generators, settings.negatives_dtype)
        for method, (energy_fn, energy_pos) in energies.items():
            log_z, ess = theorem1_estimates(energy_fn, x_t, log_mu, negatives, t)
            for name in ESTIMATES:
                out[f"{method}.{name}"] = (eq13(energy_pos, getattr(log_z, name)), float(length))
            for name in ("lower", "loo", "upper", "plugin") if settings.n_negatives > 1 else ("lower", "plugin"):
                out[f"{method}.log_z.{name}"] = (getattr(log_z, name), 1.0)
            out[f"{method}.ess"] = (ess, 1.0)
    return out


class Sums:
    """Named float64 (value_sum, weight_sum) pairs that all-reduce as one tensor in a fixed key order."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, values: Tensor, weight_per_row: float) -> None:
        entry = self.values.setdefault(key, [0.0, 0.0])
        entry[0] += float(values.to(F64).sum())
        entry[1] += weight_per_row * values.numel()

    def flat(self) -> list[float]:
        """Every (value, weight) pair in sorted key order: one list to all-reduce across ranks."""
        return [v for key in sorted(self.values) for v in self.values[key]]

    def load_flat(self, flat: list[float]) -> Sums:
        """Replace the pairs by ``flat`` (same keys and order as :meth:`flat`, e.g. summed over ranks)."""
        self.values = {key: [flat[2 * i], flat[2 * i + 1]] for i, key in enumerate(sorted(self.values))}
        return self

    def mean(self, key: str) -> float:
        value, weight = self.values[key]
        return value / weight if weight > 0 else float("nan")


def safe_exp(value: float) -> float:
    """exp that gives inf (not OverflowError) for the huge NLLs of an untrained model."""
    return float("inf") if value >= 700 else math.exp(value)  # NaN stays NaN


def _nll_entry(sums: Sums, key: str, estimate: str) -> dict:
    nll = sums.mean(key)
    return {"estimate": estimate, "nll": nll, "ppl": safe_exp(nll), "bits_per_token": nll / math.log(2),
            "tokens": sums.values[key][1]}


def summarize_likelihood(sums: Sums, methods: list[str], settings: LikelihoodSettings, rows: int,
                         seq_len: int, block_size: Optional[int] = None) -> dict:
    """Per-token NLL (nats), PPL and bits per token (BPC for characters) of every method (spec §4.4)."""
    n = settings.n_negatives
    block_size = block_size or seq_len
    out: dict = {}
    if "ar" in methods:
        out["ar"] = _nll_entry(sums, "ar", "exact NLL over the L−1 predicted tokens")
    if "mdlm" in methods and block_size < seq_len:
        out["mdlm"] = _nll_entry(sums, "mdlm", f"block-diffusion NELBO, b={block_size}, one (t, mask) per block "
                                               "(upper bound up to O(ε), docs/likelihood_bounds.md §5)")
        out["mdlm"]["block_size"] = block_size
    elif "mdlm" in methods:
        out["mdlm"] = _nll_entry(sums, "mdlm", "NELBO, one (t, mask) per row (upper bound up to O(ε), spec §4.2)")
    if "edlm_coar" in methods:
        out["edlm_coar"] = _nll_entry(sums, "edlm_coar", "Eq. 13, carry-over AR energy, log Z = 0 (= AR likelihood)")
        ar_sum, ar_rows = sums.values["ar"][0], sums.values["ar"][1] / (seq_len - 1)
        # E over masks of the coAR row is (1 − ε)·NLL_AR(row) + the first token's term (module docstring).
        out["edlm_coar"]["ar_prediction_nll"] = (1.0 - settings.schedule_eps) * ar_sum / (ar_rows * seq_len)
        out["edlm_coar"]["position0_nll"] = sums.mean("edlm_coar.position0")
    for method in ("edlm_ar", "edlm_nce"):
        if method not in methods:
            continue
        out[method] = {
            "upper": _nll_entry(sums, f"{method}.upper", f"Eq. 13 with the Theorem-1 upper log Ẑ, n={n}"),
            "lower": _nll_entry(sums, f"{method}.lower", f"Eq. 13 with the Theorem-1 lower log Ẑ_n, n={n}"),
            "plugin": _nll_entry(sums, f"{method}.plugin", "Eq. 13 with the reference code's one-negative log Ẑ"),
            "log_z_mean": {k.rsplit(".", 1)[1]: sums.mean(k) for k in sums.values if k.startswith(f"{method}.log_z.")},
            "ess_mean": sums.mean(f"{method}.ess"),
            "n_negatives": n,
        }
    return {"rows": rows, "seq_len": seq_len, "settings": settings.to_dict(), "methods": out}


def expected_keys(methods: list[str], settings: LikelihoodSettings) -> list[str]:
    keys = [m for m in methods if m in ("ar", "mdlm", "edlm_coar")]
    keys += ["edlm_coar.position0"] if "edlm_coar" in methods else []
    log_z = ("lower", "loo", "upper", "plugin") if settings.n_negatives > 1 else ("lower", "plugin")
    for method in ("edlm_ar", "edlm_nce"):
        if method in methods:
            keys += [f"{method}.{e}" for e in ESTIMATES] + [f"{method}.log_z.{e}" for e in log_z] + [f"{method}.ess"]
    return keys
