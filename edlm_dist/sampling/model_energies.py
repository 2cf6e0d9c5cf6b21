"""Energies of trained models for EDLM importance sampling (paper §4.2, spec §6.2, §6.3).

The math they evaluate is in :mod:`edlm_dist.sampling.energies`; their block-wise views against a
committed prefix are in :mod:`edlm_dist.sampling.prefix_energies`. Every energy is an
:data:`edlm_dist.sampling.energies.EnergyFn`:
``(x0 (N, L), x_t (N, L), log_mu_tokens (N, L), t (N,)) -> (N,) float64``, where
``log_mu_tokens[n, i] = log mu_theta(x0[n, i] | x_t[n])`` comes from the SAME diffusion output that
proposed x0 (0 at carried-over positions). Low energy = preferred (weights ∝ exp(-E / tau)).

* ``ar`` / ``coar``: ``E = -log p_(co)AR(x0) + log p_theta(x0 | x_t)`` (Eq. 9) in log space. The
  reference's sampling path summed mu_theta instead of log mu_theta (spec §6.3); we do not.
* ``nce``: the trained energy network ``E_phi(x_t, x0)`` (Eq. 10 / spec §6.2).
* ``oracle``: ``E = -log p_true(x0) + log p_theta(x0 | x_t)`` with the exact synthetic language, so
  p_theta * exp(-E) ∝ p_true restricted to x_t's unmasked tokens: the best any energy can do.
"""

from __future__ import annotations

from typing import Optional

import torch

from edlm_dist.errors import ConfigError
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.sampling.chunking import row_chunks, rows_per_forward, rows_within_memory
from edlm_dist.sampling.energies import ar_energy, oracle_energy
from edlm_dist.sampling.prefix_energies import ARPrefixSession, OraclePrefixSession


ENERGIES = ("ar", "coar", "nce", "oracle")
CPU_CHUNK_BYTES = 3 * 4 << 27  # AR log-prob working set of one chunk off CUDA: 2**27 logits x LOG_PROB_BYTES (1.5 GiB)
LOG_PROB_BYTES = 12  # per row, position and vocabulary entry: the logits, their fp32 copy, the log-softmax


class AREnergy:
    """EDLM-AR (``carry_over=False``) or EDLM-coAR (``carry_over=True``, paper §4.2.1) energy.

    ``log p_AR(x0^i | x0^{<i})`` for i >= 1 from one causal forward over x0 (position 0 is never
    scored, spec §6.3); the AR and diffusion terms are summed in float32 or better.

    Position 0 is left out of the diffusion term too, so the tilted target p_theta * exp(-E) keeps
    p_theta's factor for the first token instead of dividing it out (which would weight candidates
    by 1/mu_theta(x0^0)). The likelihood evaluation uses the same convention (its coAR Z is then 1).
    """

    def __init__(self, ar_model: torch.nn.Module, mask_id: int, *, carry_over: bool,
                 max_chunk_rows: Optional[int] = None, prefix_cache: bool = True):
        self.model, self.mask_id, self.carry_over = ar_model.eval(), int(mask_id), bool(carry_over)
        self.max_chunk_rows = max_chunk_rows
        self.prefix_cache = prefix_cache  # block-wise sampling: KV-cache the committed prefix (else recompute it)

    def token_log_probs(self, x0: torch.Tensor) -> torch.Tensor:
        """(N, L): column i >= 1 = log p_AR(x0^i | x0^{<i}); column 0 = 0 (unscored)."""
        n, length = x0.shape
        vocab = getattr(self.model, "vocab_size", 1)
        # All k proposals of a batch in one forward where memory allows (on CUDA: half the free memory),
        # not a fixed element count that allowed 2 rows at L=1024, V=50k.
        memory_limit = rows_within_memory(x0.device, length * vocab * LOG_PROB_BYTES, CPU_CHUNK_BYTES)
        rows = self.max_chunk_rows or rows_per_forward(x0.device, length, memory_limit)
        out = torch.zeros((n, length), dtype=torch.float32, device=x0.device)
        for part in row_chunks(n, rows):
            log_probs = self.model.log_probs(x0[part], self.mask_id)  # (n, L, V): position i predicts i + 1
            out[part, 1:] = log_probs[:, :-1].gather(-1, x0[part, 1:, None]).squeeze(-1)
        return out

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t):
        return self.block_energy(self.token_log_probs(x0), log_mu_tokens, x_t, start=0)

    def block_energy(self, log_p_ar: torch.Tensor, log_mu_tokens: torch.Tensor, x_t: torch.Tensor, *,
                     start: int) -> torch.Tensor:
        """Eq. 9 on the positions [start, start + width) of (R, width) columns: position 0 is never scored
        (its log p_AR column and diffusion term are left out), every later column is."""
        if start == 0:
            log_mu_tokens = torch.cat([torch.zeros_like(log_mu_tokens[:, :1]), log_mu_tokens[:, 1:]], dim=1)
        else:  # ar_energy ignores its first column: put a dummy one in front so that every column counts
            pad = lambda a, v: torch.cat([torch.full_like(a[:, :1], v), a], dim=1)  # noqa: E731
            log_p_ar, log_mu_tokens, x_t = pad(log_p_ar, 0), pad(log_mu_tokens, 0), pad(x_t, self.mask_id)
        energies = ar_energy(log_p_ar, log_mu_tokens, x_t, self.mask_id, carry_over=self.carry_over)
        return energies.to(torch.float64)

    def prefix_session(self, batch: int, length: int, exchange=None) -> ARPrefixSession:
        """Block-wise sampling's view of this energy for one batch (sampling/prefix_energies.py): the committed
        prefix in a KV cache shared by all proposals and steps of a block (``prefix_cache``), or recomputed;
        ``exchange`` (the proposal group) shares committed blocks between its ranks."""
        return ARPrefixSession(self, length, cached=self.prefix_cache, exchange=exchange)


class NCEEnergy:
    """The trained energy network E_phi(x_t, x0) (spec §6.2); sigma(t) only if it was trained with it."""

    def __init__(self, energy_model: torch.nn.Module, *, schedule: Optional[LogLinearSchedule] = None,
                 max_chunk_rows: Optional[int] = None):
        self.model = energy_model.eval()
        self.schedule = schedule or LogLinearSchedule()
        self.time_conditioning = bool(getattr(energy_model, "time_conditioning", False))
        self.max_chunk_rows = max_chunk_rows  # None: 256 rows, fewer on CPU (chunking.CPU_CHUNK_TOKENS)

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t):
        out = torch.empty(x0.shape[0], dtype=torch.float64, device=x0.device)
        rows = self.max_chunk_rows or rows_per_forward(x0.device, x0.shape[1], 256)
        for part in row_chunks(x0.shape[0], rows):
            sigma = self.schedule.total_noise(t[part].float()) if self.time_conditioning else None
            out[part] = self.model(x_t[part], x0[part], sigma).to(torch.float64)
        return out


class OracleEnergy:
    """``-log p_true(x0) + log p_theta(x0 | x_t)`` with an exact-likelihood language (``.log_prob``)."""

    model_free = True  # no model call: it does not count as a sequential call

    def __init__(self, language):
        self.language = language

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t):
        log_p_true = self.language.log_prob(x0.cpu()).to(x0.device)
        return oracle_energy(log_p_true, log_mu_tokens.to(torch.float64)).to(torch.float64)

    def prefix_session(self, batch: int, length: int, exchange=None) -> OraclePrefixSession:
        """Block proposals scored by the exact marginal log p_true(prefix, block) (the future summed out)."""
        return OraclePrefixSession(self.language)


def build_energy(kind: str, *, mask_id: int, ar_model: Optional[torch.nn.Module] = None,
                 energy_model: Optional[torch.nn.Module] = None, language=None):
    """The energy callable for ``kind`` in ``ENERGIES``; a missing ingredient is a ConfigError."""
    if kind in ("ar", "coar"):
        if ar_model is None:
            raise ConfigError(f"energy '{kind}' needs an AR model; set sample.ar_ckpt=<--out of an `edlm train "
                              "train.objective=ar` run>")
        return AREnergy(ar_model, mask_id, carry_over=kind == "coar")
    if kind == "nce":
        if energy_model is None:
            raise ConfigError("energy 'nce' needs a trained energy model; set sample.energy_ckpt=<--out of an "
                              "`edlm train train.objective=nce` run>")
        return NCEEnergy(energy_model)
    if kind == "oracle":
        if language is None:
            raise ConfigError("energy 'oracle' needs the exact synthetic language; it is only available when the "
                              "diffusion model was trained on data.source=synthetic")
        return OracleEnergy(language)
    raise ConfigError(f"energy '{kind}' is unknown; use one of {list(ENERGIES)}")
