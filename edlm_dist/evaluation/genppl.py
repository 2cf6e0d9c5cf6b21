"""Generative perplexity (spec §7.1): score generated text with an oracle causal LM.

The aggregate is token-weighted over all samples — exp(Σ w·nll / Σ w) — never a mean of
per-sample perplexities (MDLM PR #4). Sums are float64 Python floats so a distributed caller can
all-reduce `state()` and rebuild with `from_state()`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edlm_dist.data.hub import from_pretrained_offline_first
from edlm_dist.errors import DataError


def genppl_token_weights(input_ids: Tensor, attention_mask: Tensor, eos_id: int) -> Tensor:
    """MDLM's Gen-PPL weights for target positions 1..N−1, shape (B, N−1) float (spec §7.1 item 7).

    A target counts if it is not EOS, or if it is the row's first EOS (an EOS at position 0 is
    context only, and then no later EOS counts). Text after an EOS is still scored. Padding
    (attention_mask == 0) never counts — a deliberate departure from MDLM, which can count the
    first padding EOS of a row that has no EOS of its own.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise DataError(
            f"input_ids and attention_mask must both be (B, N), got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    is_eos = input_ids == eos_id
    # cumsum == 1 holds from the first EOS up to (not including) the second; AND with is_eos
    # keeps only the first EOS itself.
    first_eos = is_eos & (is_eos.cumsum(dim=-1) == 1)
    weights = (~is_eos | first_eos) & attention_mask.bool()
    return weights[:, 1:].to(torch.float32)


@dataclass
class GenPPLAccumulator:
    """Token-weighted NLL sums (float64); value() = exp(nll_sum / weight_sum)."""

    nll_sum: float = 0.0
    weight_sum: float = 0.0

    def add(self, nll: Tensor, weights: Tensor) -> None:
        """Add per-token NLLs (nats) with their weights (same shape)."""
        if nll.shape != weights.shape:
            raise DataError(
                f"nll and weights must have the same shape, got {tuple(nll.shape)} and {tuple(weights.shape)}"
            )
        w = weights.to(torch.float64)
        self.nll_sum += float((nll.to(torch.float64) * w).sum())
        self.weight_sum += float(w.sum())

    def merge(self, other: GenPPLAccumulator) -> GenPPLAccumulator:
        """Fold another accumulator's sums into this one (returns self)."""
        self.nll_sum += other.nll_sum
        self.weight_sum += other.weight_sum
        return self

    def mean_nll(self) -> float:
        if self.weight_sum <= 0:
            raise DataError("Gen PPL has no scored tokens; generate non-empty samples (≥ 2 tokens each)")
        return self.nll_sum / self.weight_sum

    def value(self) -> float:
        return math.exp(self.mean_nll())

    def state(self) -> dict[str, float]:
        return {"nll_sum": float(self.nll_sum), "weight_sum": float(self.weight_sum)}

    @classmethod
    def from_state(cls, state: dict[str, float]) -> GenPPLAccumulator:
        return cls(nll_sum=float(state["nll_sum"]), weight_sum=float(state["weight_sum"]))


def exact_sequence_genppl(log_probs_rows: Tensor, num_scored_tokens: int) -> GenPPLAccumulator:
    """Gen PPL under an oracle whose exact sequence log-probability is known (synthetic tasks).

    Each row contributes −log p(row) spread over `num_scored_tokens` tokens, aggregated
    token-weighted: exp(−Σ_rows log p(row) / (B · num_scored_tokens)).
    """
    log_probs = torch.as_tensor(log_probs_rows).to(torch.float64)
    if log_probs.dim() != 1 or int(num_scored_tokens) < 1:
        raise DataError(
            f"need (B,) row log-probs and num_scored_tokens ≥ 1, got shape {tuple(log_probs.shape)} "
            f"and {num_scored_tokens}"
        )
    return GenPPLAccumulator(
        nll_sum=float(-log_probs.sum()), weight_sum=float(log_probs.numel() * int(num_scored_tokens))
    )


# A hub id is "name" or "owner/name"; anything else that does not exist locally is a typo'd path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_oracle_location(path_or_name: str) -> None:
    path = os.fspath(path_or_name)
    if os.path.exists(path):
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise DataError(f"oracle folder {path} has no config.json; pass a folder written by save_pretrained()")
        return
    if not _HUB_ID.match(path):
        raise DataError(
            f"Gen PPL oracle {path} does not exist; pass a local model folder or a hub name like gpt2-large"
        )


class HFCausalLMOracle:
    """A local (or hub) HF causal LM and its tokenizer that scores text for Gen PPL (spec §7.1).

    Scoring follows MDLM for texts that fit the oracle context: retokenise without adding BOS, pad
    with pad := eos, first token unscored, weights from `genppl_token_weights`, batches of
    `batch_size`, fp32, eval. Decision: `add_special_tokens=False` for every tokenizer, so Llama
    oracles get no BOS either.

    Longer texts (semi-autoregressive samples) are scored whole, with no post-processing: MDLM
    truncates them to the context, or cuts them into chunks whose first token is never scored; here a
    sliding window advances by half the context, every token after the first is scored exactly once,
    with at least half a context before it (:func:`sliding_windows`). The EOS weights are those of the
    whole text (only its first EOS counts). ``max_length`` truncates first when given (None: whole text).
    """

    def __init__(self, path_or_name: str, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 max_length: int | None = None) -> None:
        check_oracle_location(path_or_name)  # before importing/loading anything heavy
        if batch_size < 1:
            raise DataError(f"oracle batch_size must be ≥ 1, got {batch_size}")
        # transformers takes seconds to import and only HF oracles need it (the exact oracle does not).
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import edlm_dist.artifacts.hf_models  # noqa: F401  registers exported edlm AR models with the Auto classes

        try:  # a hub name: the local HF cache first, the network only after a miss (data/hub.py)
            self.tokenizer = from_pretrained_offline_first(AutoTokenizer, path_or_name)
            self.model = from_pretrained_offline_first(AutoModelForCausalLM, path_or_name, dtype=torch.float32)
        except OSError as err:  # missing files, no network for a hub name, ...
            raise DataError(f"cannot load Gen PPL oracle {path_or_name}: {str(err).splitlines()[0]}") from err
        if self.tokenizer.eos_token_id is None:
            raise DataError(f"oracle tokenizer {path_or_name} has no EOS token; Gen PPL weights need one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        config = self.model.config
        self.context = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        self.max_length = int(max_length) if max_length is not None else None
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Per text: (Σ w·nll, Σ w) over its scored tokens, float64 (N,) each (the per-sample values)."""
        nll_sums = torch.zeros(len(texts), dtype=torch.float64)
        weight_sums = torch.zeros(len(texts), dtype=torch.float64)
        eos_id = self.tokenizer.eos_token_id
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                truncation=self.max_length is not None, max_length=self.max_length, add_special_tokens=False,
            )
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            rows = slice(start, start + ids.shape[0])
            weights = genppl_token_weights(ids, mask, eos_id).to(torch.float64)  # targets 1..N-1, whole text
            for lo, first, hi in sliding_windows(ids.shape[1], self.context):
                logits = self.model(input_ids=ids[:, lo:hi], attention_mask=mask[:, lo:hi]).logits
                # Targets first..hi-1 are predicted by the logits at positions first-1..hi-2.
                scored = logits[:, first - 1 - lo : hi - 1 - lo].float()
                nll = F.cross_entropy(scored.transpose(1, 2), ids[:, first:hi], reduction="none")
                window_weights = weights[:, first - 1 : hi - 1]
                nll_sums[rows] += (nll.to(torch.float64) * window_weights).sum(-1).cpu()
                weight_sums[rows] += window_weights.sum(-1).cpu()
        return nll_sums, weight_sums

    def score(self, texts: list[str]) -> GenPPLAccumulator:
        """Token-weighted NLL sums of `texts` under the oracle."""
        nll, weights = self.score_texts(texts)
        return GenPPLAccumulator(nll_sum=float(nll.sum()), weight_sum=float(weights.sum()))


def sliding_windows(length: int, context: int) -> list[tuple[int, int, int]]:
    """``(lo, first, hi)``: run the oracle on tokens [lo, hi) and score targets [first, hi); every target
    1..length-1 is scored once. One window when the text fits; else each next window starts half a
    context before the previous one's end, so every target sees at least context // 2 tokens before it."""
    windows, lo, first = [], 0, 1
    while first < length:
        hi = min(lo + context, length)
        windows.append((lo, first, hi))
        first, lo = hi, max(lo + 1, hi - context // 2)
    return windows
