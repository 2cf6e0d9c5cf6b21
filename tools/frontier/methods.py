"""The samplers on the frontier, how each one runs, and what it costs (tools/frontier).

A :class:`Method` is one sampler setting. Its *family* groups the settings a user would tune together
(e.g. ``edlm-ar-block``: block-wise EDLM with the AR energy); its *curve* groups the settings that differ
only in the number of grid steps T, the knob the speed-up interpolates along.

Families: ``mdlm`` (whole row, cached ``ddpm_cache``), ``mdlm-ancestral`` (whole row, ``ddpm`` without
caching), ``mdlm-block`` (block-wise MDLM with the bidirectional denoiser), ``ar`` (the AR baseline sampler
with its KV cache), ``edlm-E`` (whole-row EDLM with energy E), ``edlm-E-block`` (block-wise EDLM; the AR
energies against their prefix KV cache).

Every sampler starts from the row's framing token: position 0 is BOS (as in every training row, and as the
AR sampler fixes it); the rest is generated. Per setting and seed, :func:`run_method` records the exact NLL of every sample, wall and CPU seconds per
sample, sequential model calls per sample (a batch's calls are shared by its rows: denoiser calls +
energy calls + prefix-cache calls, or the AR sampler's calls), and model tokens per sample (every token
fed to a model forward: a whole-row denoiser call costs L per row, a cached AR chunk its own tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ENERGIES = ("ar", "coar", "nce", "oracle")


@dataclass(frozen=True)
class Method:
    family: str
    steps: int = 0  # grid steps (per block for block-wise samplers); 0 for the AR sampler
    energy: Optional[str] = None
    k: int = 1
    window: object = 1.0
    block_size: int = 0
    update: str = "ddpm_cache"
    model_block: int = 0  # > 0: the block-causal denoiser trained with this model.block_size (families bc-*)
    block_proposal: str = "denoiser"  # "ar_first": each block's first token proposed from p_AR (families *-arfirst)
    lookahead: bool = False  # block-causal EDLM: next block's first call beside the scoring call (families *-lookahead)

    @property
    def curve(self) -> str:
        """The setting without T: the settings of one curve differ only in T."""
        parts = [self.family]
        if self.energy is not None:
            parts.append(f"k={self.k}, w={_window_text(self.window)}")
        if self.block_size:
            parts.append(f"b={self.block_size}")
        if self.model_block:
            parts.append(f"model b={self.model_block}")
        return " ".join(parts)

    @property
    def name(self) -> str:
        return self.curve if self.family == "ar" else f"{self.curve} T={self.steps}"

    def settings(self, seed: int):
        from edlm_dist.sampling.settings import SamplerSettings

        if self.family == "ar":
            return SamplerSettings(sampler="ar", seed=seed)
        sampler = "mdlm" if self.energy is None else "edlm"
        return SamplerSettings(sampler=sampler, update=self.update, steps=self.steps, k=self.k, window=self.window,
                               block_size=self.block_size, seed=seed, block_proposal=self.block_proposal,
                               block_lookahead=self.lookahead)

    def as_dict(self) -> dict:
        window = list(self.window) if isinstance(self.window, tuple) else self.window
        return {"family": self.family, "curve": self.curve, "name": self.name, "steps": self.steps,
                "energy": self.energy, "k": self.k, "window": window, "block_size": self.block_size,
                "update": self.update, "model_block": self.model_block, "block_proposal": self.block_proposal,
                "lookahead": self.lookahead}


def _window_text(window) -> str:
    return f"[{window[0]:g},{window[1]:g}]" if isinstance(window, (tuple, list)) else f"{window:g}"


def parse_window(text: str):
    """'1' -> 1.0; '0:0.75' -> (0.0, 0.75)."""
    return tuple(float(v) for v in text.split(":")) if ":" in text else float(text)


class TokenCounter:
    """Counts the token positions each model's transformer processes: a pre-hook on its first block sees the
    (rows, positions, H) activations of every forward, whole-row or cached chunk (models call their methods
    directly, so a hook on the model itself would miss ``log_probs``)."""

    def __init__(self, *models: torch.nn.Module):
        self.tokens = 0
        for model in models:
            model.blocks[0].register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.tokens += args[0].shape[0] * args[0].shape[1]


@dataclass
class Models:
    """The trained models of one ``edlm pipeline`` folder, with token counting on every forward."""

    denoiser: object
    energies: dict
    ar_model: torch.nn.Module
    language: object
    meta: dict
    counter: TokenCounter = field(repr=False, default=None)
    block_causal: dict = field(default_factory=dict)  # model.block_size -> its prefix-cached denoiser

    @property
    def length(self) -> int:
        return int(self.meta["seq_len"])


def load_models(runs: Path, block_causal_runs: tuple = ()) -> Models:
    from edlm_dist.artifacts.weights import load_trained_model
    from edlm_dist.errors import EdlmError
    from edlm_dist.pipeline.run import load_pipeline_models

    try:
        denoiser, energies, language, meta = load_pipeline_models(runs)
    except EdlmError as exc:
        raise SystemExit(f"error: {exc}") from None
    ar, nce = energies["ar"].model, energies["nce"].model
    models = Models(denoiser, energies, ar, language, meta, TokenCounter(denoiser.model, ar, nce))
    for path in block_causal_runs:  # block-causal DiTs (issue 22) trained on the same data
        from edlm_dist.sampling.block_denoiser import make_denoiser

        model, bc_meta, _ = load_trained_model(path, expect_kind="dit")
        if (bc_meta["seq_len"], bc_meta["vocab_size"]) != (meta["seq_len"], meta["vocab_size"]):
            raise SystemExit(f"error: {path} was trained on rows of another length or vocabulary than {runs}")
        if not getattr(model, "is_block_causal", False):
            raise SystemExit(f"error: {path} holds a whole-row DiT; --block-causal takes block-causal runs")
        model.blocks[0].register_forward_pre_hook(models.counter._count)
        models.block_causal[int(model.block_size)] = make_denoiser(model, meta["mask_id"], meta["vocab_size"])
    return models


def _sample_once(models: Models, method: Method, settings, ids: list[int]):
    from edlm_dist.sampling.ar_sampler import sample_ar_batch
    from edlm_dist.sampling.blocks import sample_rows

    meta = models.meta
    if method.family == "ar":
        out = sample_ar_batch(models.ar_model, settings, ids, length=models.length, mask_id=meta["mask_id"],
                              bos_id=models.language.bos_id)
        return out.tokens, out.nfe
    energy = models.energies[method.energy] if method.energy else None
    denoiser = models.block_causal[method.model_block] if method.model_block else models.denoiser
    x_init = torch.full((len(ids), models.length), meta["mask_id"], dtype=torch.long)
    x_init[:, 0] = models.language.bos_id  # every row's framing token, as the AR sampler fixes it (docs/frontier.md)
    out = sample_rows(denoiser, settings, ids, length=models.length, mask_id=meta["mask_id"], energy_fn=energy,
                      x_init=x_init)
    return out.tokens, out.nfe + out.energy_calls + out.prefix_calls


def run_method(models: Models, method: Method, seed: int, samples: int, batch: int) -> dict:
    """Sample ids 0..samples-1 in batches with ``method`` and ``seed``: per-sample NLLs and per-sample costs."""
    settings = method.settings(seed)
    rows, calls = [], 0.0
    tokens_before = models.counter.tokens
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, samples, batch):
        ids = list(range(start, min(samples, start + batch)))
        tokens, batch_calls = _sample_once(models, method, settings, ids)
        rows.append(tokens)
        calls += batch_calls * len(ids)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = torch.cat(rows)
    nll = (-models.language.log_prob(tokens)).tolist()
    return {"seed": seed, "nll": nll, "scored_tokens": models.language.num_scored_tokens,
            "seconds": wall / samples, "cpu_seconds": cpu / samples, "calls": calls / samples,
            "tokens": (models.counter.tokens - tokens_before) / samples}


def default_grid(length: int, energies=ENERGIES, model_blocks=()) -> list[Method]:
    """The settings swept by default (docs/frontier.md): each family at the knobs that matter for it. At L > 64
    the slowest corners are left out (whole-row EDLM beyond T = 64, the NCE network on block proposals beyond
    two settings); coAR equals AR when a block is proposed fully masked (one step per block), so its block
    curves start at T = 2."""
    long = length > 64
    mdlm_steps = (16, 32, 64, 128, 256, 512, 1024) if long else (8, 16, 32, 64, 128, 256, 512)
    grid = [Method("mdlm", steps) for steps in mdlm_steps]
    grid += [Method("mdlm-ancestral", steps, update="ddpm") for steps in ((64, 256) if long else (16, 32, 64, 128))]
    grid += [Method("mdlm-block", steps, block_size=b) for b in (1, 2, 4) for steps in (1, 2, 4, 8) if steps <= 2 * b]
    grid.append(Method("ar"))
    for energy in energies:
        full_steps = (32, 64) if long else (16, 32, 64)
        grid += [Method(f"edlm-{energy}", steps, energy, k=8, window=window)
                 for window in (1.0, (0.0, 0.75)) for steps in full_steps]
        blocks = ((2, 8),) if long and energy == "nce" else ((1, 4), (2, 8), (2, 32), (4, 16))
        grid += [Method(f"edlm-{energy}-block", steps, energy, k=k, window=1.0, block_size=b)
                 for b, k in blocks for steps in (1, 2, 4) if steps <= b + 1 and (energy != "coar" or steps > 1)]
        if energy in ("ar", "coar"):  # the first token of each block proposed from the AR prefix cache
            grid += [Method(f"edlm-{energy}-block-arfirst", steps, energy, k=k, window=1.0, block_size=b,
                            block_proposal="ar_first")
                     for b, k in ((2, 8), (2, 32), (3, 32), (4, 32)) + (((3, 128), (4, 128)) if long else ())
                     for steps in (1, 2) if energy != "coar" or steps > 1]
    for m in model_blocks:  # block-causal denoisers: sampler blocks that divide the model's
        sizes = [b for b in (1, 2, 4, 8) if b <= m and m % b == 0]
        grid += [Method("bc-mdlm", steps, block_size=b, model_block=m) for b in sizes for steps in (1, 2, 4, 8)
                 if steps <= 2 * b]
        for energy in energies:
            # At L > 64, blocks of 4 with many proposals: half the rounds of b = 2 (the batch-1 wall clock).
            wide = ((4, 48), (4, 64), (4, 96)) if long else ()
            grid += [Method(f"bc-edlm-{energy}-block", steps, energy, k=k, window=1.0, block_size=b, model_block=m)
                     for b, k in ((1, 4), (2, 8), (2, 32), (4, 16)) + wide if b in sizes for steps in (1, 2, 4)
                     if steps <= b + 1 and (energy != "coar" or steps > 1) and energy != "nce"]
            if energy == "ar":
                grid += [Method("bc-edlm-ar-block-arfirst", steps, "ar", k=k, window=1.0, block_size=b, model_block=m,
                                block_proposal="ar_first")
                         for b, k in ((2, 8), (2, 32), (4, 32)) if b in sizes for steps in (1, 2)]
                # One round per block (sampling/lookahead.py): T = 1, where the chosen proposal is committed whole.
                grid += [Method(f"bc-edlm-ar-block{suffix}-lookahead", 1, "ar", k=k, window=1.0, block_size=b,
                                model_block=m, block_proposal=proposal, lookahead=True)
                         for suffix, proposal in (("", "denoiser"), ("-arfirst", "ar_first"))
                         for b, k in ((2, 8), (2, 32), (4, 32)) if b in sizes]
    return grid
