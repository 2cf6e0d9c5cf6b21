"""Sample quality: Gen PPL under an oracle and unigram entropy, distributed over ranks (spec §7.1-7.3).

Sample files are the JSONL written by ``edlm sample`` (one row per sample, at least ``tokens``; also
``text`` and ``seconds``) with a ``summary.json`` of the sampler settings next to them. Rows are split
into contiguous blocks over the ranks; each rank scores its block and the float64 sums (token-weighted
NLL, entropies, seconds) are all-reduced, so the result does not depend on the number of ranks.

Oracles: ``ExactSyntheticOracle`` (the synthetic language's exact log p(row), spread over its L−1
scored tokens) and ``HFOracle`` (any local HF causal LM, MDLM's protocol in genppl.py). The data's own
values (validation rows under the same oracle, their entropy, and the synthetic language's exact
entropy rate) are computed the same way for comparison.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Protocol

import torch

from edlm_dist.artifacts.samples import read_sample_summary, read_samples_jsonl, sampler_setting
from edlm_dist.data.loader import build_eval_loader
from edlm_dist.errors import DataError
from edlm_dist.evaluation.entropy import unigram_entropy_bits
from edlm_dist.evaluation.genppl import GenPPLAccumulator, HFCausalLMOracle, exact_sequence_genppl
from edlm_dist.parallel.collectives import all_reduce_float64

METHOD_NAMES = {"ar": "EDLM-AR", "coar": "EDLM-coAR", "nce": "EDLM-NCE", "oracle": "EDLM-oracle"}


# ---------------------------------------------------------------------------------------- files
def method_name(summary: dict, path: str | Path) -> str:
    """'MDLM', 'EDLM-AR', ... from the summary; the file's folder name when the sampler is unknown."""
    sampler = sampler_setting(summary, "sampler")
    if sampler == "mdlm":
        return "MDLM"
    if sampler == "edlm":
        energy = str(sampler_setting(summary, "energy") or "")
        return METHOD_NAMES.get(energy, f"EDLM-{energy}" if energy else "EDLM")
    return Path(path).parent.name or Path(path).stem


# -------------------------------------------------------------------------------------- oracles
class Oracle(Protocol):
    name: str

    def score_rows(self, rows: list[dict]) -> GenPPLAccumulator: ...


class ExactSyntheticOracle:
    """Exact Gen PPL under the synthetic language: exp(−Σ log p(row) / (rows · (L−1))) (spec §7.1 analogue)."""

    name = "exact"

    def __init__(self, language) -> None:
        self.language = language

    def score_rows(self, rows: list[dict]) -> GenPPLAccumulator:
        if not rows:
            return GenPPLAccumulator()
        lengths = {len(row["tokens"]) for row in rows}
        if lengths != {self.language.seq_len}:
            raise DataError(f"the exact oracle scores rows of length {self.language.seq_len}, got lengths "
                            f"{sorted(lengths)}; sample with the data's seq_len or use an HF oracle")
        tokens = torch.tensor([row["tokens"] for row in rows], dtype=torch.long)
        return exact_sequence_genppl(self.language.log_prob(tokens), self.language.num_scored_tokens)


class HFOracle:
    """A local HF causal LM scoring the decoded text (HFCausalLMOracle, MDLM's Gen-PPL protocol)."""

    def __init__(self, path: str, *, device: torch.device | str = "cpu", batch_size: int = 8,
                 max_length: Optional[int] = None, tokenizer=None) -> None:
        self.name = str(path)
        self.oracle = HFCausalLMOracle(path, device=device, batch_size=batch_size, max_length=max_length)
        self.tokenizer = tokenizer  # decodes rows without a 'text' field (the model's own tokenizer)

    def texts(self, rows: list[dict]) -> list[str]:
        out = []
        for row in rows:
            if isinstance(row.get("text"), str):
                out.append(row["text"])
            elif self.tokenizer is not None:
                out.append(self.tokenizer.decode(row["tokens"]))  # special tokens kept (spec §7.1 item 2)
            else:
                raise DataError("a sample has no 'text' field and no tokenizer is known to decode it; "
                                "write 'text' in the samples or set data.dir to the prepared data")
        return out

    def score_rows(self, rows: list[dict]) -> GenPPLAccumulator:
        return self.oracle.score(self.texts(rows)) if rows else GenPPLAccumulator()


# ------------------------------------------------------------------------------------- metrics
def rank_block(n: int, rank: int, size: int) -> slice:
    """Contiguous block of ``n`` items for ``rank`` of ``size`` (sizes differ by at most one)."""
    return slice(n * rank // size, n * (rank + 1) // size)


def score_rows(rows: list[dict], oracle: Optional[Oracle], *, entropy: bool, dp_rank: int = 0, dp_size: int = 1,
               dp_group=None, device: torch.device | str = "cpu") -> dict:
    """Gen PPL (token-weighted over all rows), mean unigram entropy (bits), mean seconds per sample.

    Each rank handles its block of rows; collective over ``dp_group`` when torch.distributed is up.
    """
    mine = rows[rank_block(len(rows), dp_rank, dp_size)]
    acc = oracle.score_rows(mine) if oracle is not None else GenPPLAccumulator()
    entropy_sum = 0.0
    if entropy:
        entropy_sum = sum(float(unigram_entropy_bits(torch.tensor(row["tokens"]))) for row in mine)
    seconds = [float(row["seconds"]) for row in mine if isinstance(row.get("seconds"), (int, float))]
    sums = all_reduce_float64([acc.nll_sum, acc.weight_sum, entropy_sum, float(len(mine)), sum(seconds),
                               float(len(seconds))], dp_group, device)
    out: dict = {"num_samples": int(sums[3])}
    if oracle is not None:
        total = GenPPLAccumulator(nll_sum=sums[0], weight_sum=sums[1])
        out.update(gen_ppl=total.value(), gen_nll=total.mean_nll(), scored_tokens=total.weight_sum,
                   oracle=oracle.name)
    if entropy:
        out["entropy_bits"] = sums[2] / sums[3]
    out["seconds_per_sample"] = sums[4] / sums[5] if sums[5] > 0 else None
    return out


def evaluate_sample_file(path: str | Path, oracle: Optional[Oracle], *, entropy: bool, dp_rank: int = 0,
                         dp_size: int = 1, dp_group=None, device: torch.device | str = "cpu") -> dict:
    """Metrics of one sample file with the sampler settings that produced it."""
    rows = read_samples_jsonl(path)
    summary = read_sample_summary(path)
    out = {"file": str(path), "method": method_name(summary, path)}
    for key in ("steps", "k", "window", "temperature", "update", "precision"):
        out[key] = sampler_setting(summary, key)
    out.update(score_rows(rows, oracle, entropy=entropy, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group,
                          device=device))
    out["sampler_settings"] = summary
    return out


def data_reference(data_dir: str | Path, oracle: Optional[Oracle], *, entropy: bool, num_rows: int,
                   tokenizer=None, language=None, split: str = "valid", dp_rank: int = 0, dp_size: int = 1,
                   dp_group=None, device: torch.device | str = "cpu") -> dict:
    """The data's own values: the first ``num_rows`` validation rows scored like samples, and for the
    synthetic language its exact entropy rate (the Gen PPL of perfect samples is exp of it)."""
    loader = build_eval_loader(data_dir, split, micro_batch=max(num_rows, 1), max_rows=num_rows)
    rows = [{"tokens": row.tolist()} for batch in loader for row in batch]
    if tokenizer is not None:
        for row in rows:
            row["text"] = tokenizer.decode(row["tokens"])
    out = {"split": split, **score_rows(rows, oracle, entropy=entropy, dp_rank=dp_rank, dp_size=dp_size,
                                         dp_group=dp_group, device=device)}
    out.pop("seconds_per_sample", None)
    if language is not None:
        rate, stderr = language.entropy_per_token()
        out.update(entropy_rate_nats=rate, entropy_rate_stderr=stderr, entropy_rate_ppl=math.exp(rate))
    return out
