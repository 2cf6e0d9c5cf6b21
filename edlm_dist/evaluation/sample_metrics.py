"""Sample quality: Gen PPL under an oracle, unigram entropy and time per sample (spec §7.1-7.3).

The one place that scores samples: ``edlm eval``, the pipeline and the benchmarks call
:func:`score_samples` (rows or token tensors), :func:`score_sample_file` / :func:`evaluate_sample_file`
(files written by ``edlm sample``) and :func:`data_reference` (the data's own values). Scores are
kept per sample (:class:`SampleScores`: NLL sum and scored tokens under the oracle, entropy, seconds),
so a confidence interval can resample them; :meth:`SampleScores.summary` aggregates: Gen PPL is
token-weighted over all samples, exp(Σ nll / Σ tokens), never a mean of per-sample perplexities,
and each aggregate carries its 95 % percentile-bootstrap interval over the samples (evaluation/intervals.py;
seconds over the timed batches, whose rows share one measurement). :func:`compare_at_equal_steps` states
each method against a baseline at the same step count: the Gen PPL ratio, its interval, its bootstrap
p-value and Holm's correction over the family of comparisons.

Distributed: rows are split into contiguous blocks over the ranks; each rank scores its block and
the per-sample values are summed into full-length float64 vectors (every entry has exactly one
non-zero contributor), so every rank holds every sample's values and the aggregates do not depend
on the number of ranks.

Oracles: :class:`ExactSyntheticOracle` (the synthetic language's exact log p(row), spread over its
L−1 scored tokens) and :class:`HFOracle` (any local HF causal LM, MDLM's protocol in genppl.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import Tensor

from edlm_dist.artifacts.samples import read_sample_summary, read_samples_jsonl, sampler_setting
from edlm_dist.data.loader import build_eval_loader
from edlm_dist.data.shards import load_manifest
from edlm_dist.errors import DataError
from edlm_dist.evaluation.entropy import unigram_entropy_bits
from edlm_dist.evaluation.genppl import GenPPLAccumulator, HFCausalLMOracle
from edlm_dist.evaluation.intervals import RatioStatistic, bootstrap_interval, compare, holm_significant
from edlm_dist.evaluation.ngram_judge import KneserNeyJudge
from edlm_dist.parallel.collectives import all_reduce_float64

METHOD_NAMES = {"ar": "EDLM-AR", "coar": "EDLM-coAR", "nce": "EDLM-NCE", "oracle": "EDLM-oracle"}
SETTING_KEYS = ("steps", "k", "window", "temperature", "update", "precision")


def method_name(summary: dict, path: str | Path) -> str:
    """'MDLM', 'EDLM-AR', ... from the summary; the file's folder name when the sampler is unknown."""
    sampler = sampler_setting(summary, "sampler")
    if sampler == "mdlm":
        return "MDLM"
    if sampler == "ar":
        return "AR"
    if sampler == "edlm":
        energy = str(sampler_setting(summary, "energy") or "")
        return METHOD_NAMES.get(energy, f"EDLM-{energy}" if energy else "EDLM")
    return Path(path).parent.name or Path(path).stem


# -------------------------------------------------------------------------------------- oracles
class Oracle(Protocol):
    name: str

    def score_rows(self, rows: list[dict]) -> tuple[Tensor, Tensor]:
        """Per row: (NLL summed over its scored tokens, number of scored tokens), float64 (n,) each."""


class ExactSyntheticOracle:
    """Exact Gen PPL under the synthetic language: exp(−Σ log p(row) / Σ (N−1)) (spec §7.1 analogue).

    Rows of any length N are scored whole: a row longer than the data's rows (semi-autoregressive
    sampling) is one document ``[BOS] + N−2 tokens + [EOS]`` of the same language at length N.
    """

    name = "exact"

    def __init__(self, language) -> None:
        self.language = language
        self._by_length = {language.seq_len: language}

    def language_at(self, length: int):
        """The same language (same tables) with rows of ``length`` tokens."""
        if length not in self._by_length:
            from edlm_dist.data.synthetic import SyntheticLanguage

            self._by_length[length] = SyntheticLanguage(self.language.cfg, length)
        return self._by_length[length]

    def log_probs(self, token_rows: list[list[int]]) -> torch.Tensor:
        """(rows,) float64 exact log p of rows of any lengths, in input order."""
        out = torch.empty(len(token_rows), dtype=torch.float64)
        for length in sorted({len(row) for row in token_rows}):
            index = [i for i, row in enumerate(token_rows) if len(row) == length]
            out[index] = self.language_at(length).log_prob(torch.tensor([token_rows[i] for i in index]))
        return out

    def score_rows(self, rows: list[dict]) -> tuple[Tensor, Tensor]:
        if not rows:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        token_rows = [row["tokens"] for row in rows]
        nll = -self.log_probs(token_rows)
        return nll, torch.tensor([len(row) - 1 for row in token_rows], dtype=torch.float64)


def prompt_length(row: dict) -> int:
    """Tokens of a sample's prompt: its leading fixed span (``spans`` in samples.jsonl), at least BOS."""
    spans = row.get("spans") or []
    return max(1, spans[0][1]) if spans and spans[0][0] == 0 and spans[0][2] == "fixed" else 1


class PromptedExactOracle(ExactSyntheticOracle):
    """Conditional Gen PPL of prompted rows: −log p(continuation | prompt) = −log p(row) + log p(prompt), over
    the N − p tokens after a p-token prompt (the exact prefix marginal, ``SyntheticLanguage.prefix_log_prob``).
    A row without a prompt scores as under :class:`ExactSyntheticOracle` (its prompt is BOS, p = 1)."""

    name = "exact-conditional"

    def score_rows(self, rows: list[dict]) -> tuple[Tensor, Tensor]:
        nll, _ = super().score_rows(rows)
        lengths = [(len(row["tokens"]), prompt_length(row)) for row in rows]
        for length, prompt in sorted(set(lengths)):
            index = [i for i, key in enumerate(lengths) if key == (length, prompt)]
            prefixes = torch.tensor([rows[i]["tokens"][:prompt] for i in index])
            nll[index] += self.language_at(length).prefix_log_prob(prefixes)
        return nll, torch.tensor([n - p for n, p in lengths], dtype=torch.float64)


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

    def score_rows(self, rows: list[dict]) -> tuple[Tensor, Tensor]:
        return self.oracle.score_texts(self.texts(rows))


def fit_ngram_judge(data_dir: str | Path, order: int) -> KneserNeyJudge:
    """The independent real-text judge: a Kneser-Ney n-gram model fitted on the validation split only
    (no model trains on it), in the data's own token ids."""
    manifest = load_manifest(data_dir)
    loader = build_eval_loader(data_dir, "valid", micro_batch=256, manifest=manifest)
    return KneserNeyJudge(order, int(manifest["vocab_size"])).fit(row.tolist() for batch in loader for row in batch)


# ------------------------------------------------------------------------------------- scores
@dataclass
class SampleScores:
    """Per-sample values, float64 (N,) in sample order; None where not measured."""

    num_samples: int
    nll: Optional[Tensor] = None  # oracle NLL of each sample, nats summed over its scored tokens
    scored_tokens: Optional[Tensor] = None  # tokens the oracle scored in each sample
    entropy_bits: Optional[Tensor] = None  # unigram entropy of each sample
    seconds: Optional[Tensor] = None  # wall seconds each sample took (its batch's time / batch size); NaN: untimed
    oracle: Optional[str] = None
    timing_batches: Optional[Tensor] = None  # the batch each sample was timed in; None: each sample on its own

    def gen_ppl_statistic(self) -> RatioStatistic:
        """exp(Σ NLL / Σ scored tokens) over the samples, for intervals and comparisons."""
        if self.nll is None:
            raise DataError("these samples were scored without an oracle; set eval.oracle to get a Gen PPL")
        return RatioStatistic.gen_ppl(self.nll, self.scored_tokens)

    def seconds_statistic(self) -> Optional[RatioStatistic]:
        """Mean seconds per timed sample, resampled by batch: the rows of a batch share one measurement
        (its time / its size), so a batch, not a row, is one independent observation."""
        if self.seconds is None:
            return None
        timed = ~torch.isnan(self.seconds)
        if not bool(timed.any()):
            return None
        batches = (self.timing_batches if self.timing_batches is not None else torch.arange(self.num_samples))[timed]
        labels = torch.unique(batches, return_inverse=True)[1]
        per_batch = torch.zeros(int(labels.max()) + 1, dtype=torch.float64)
        return RatioStatistic(per_batch.index_add(0, labels, self.seconds[timed]),
                              per_batch.index_add(0, labels, torch.ones_like(self.seconds[timed])))

    def summary(self) -> dict:
        """Aggregates: Gen PPL (token-weighted), mean NLL per token (+ standard error over samples),
        mean entropy, mean seconds per sample; Gen PPL, entropy and seconds each with ``<key>_interval``,
        its 95 % percentile-bootstrap interval (``Interval.as_dict``: estimate, low, high, level)."""
        out: dict = {"num_samples": self.num_samples}
        if self.nll is not None:
            total = GenPPLAccumulator(nll_sum=float(self.nll.sum()), weight_sum=float(self.scored_tokens.sum()))
            per_token = self.nll / self.scored_tokens
            stderr = float(per_token.std() / math.sqrt(self.num_samples)) if self.num_samples > 1 else None
            interval = replace(bootstrap_interval(self.gen_ppl_statistic()), estimate=total.value())  # one rounding
            out.update(gen_ppl=total.value(), gen_ppl_interval=interval.as_dict(),
                       gen_nll=total.mean_nll(), scored_tokens=total.weight_sum, nll_per_token=float(per_token.mean()),
                       nll_per_token_stderr=stderr, oracle=self.oracle)
        if self.entropy_bits is not None:
            out["entropy_bits"] = float(self.entropy_bits.mean())
            out["entropy_bits_interval"] = bootstrap_interval(RatioStatistic.mean(self.entropy_bits)).as_dict()
        seconds = self.seconds_statistic()
        interval = bootstrap_interval(seconds).as_dict() if seconds is not None else None
        out["seconds_per_sample"] = interval["estimate"] if interval else None  # the mean over timed samples
        out["seconds_per_sample_interval"] = interval
        return out


def compare_at_equal_steps(cells: dict[tuple[str, int], SampleScores], baseline: str) -> list[dict]:
    """Every method against ``baseline`` at the same step count (cells keyed ``(method, steps)``): Gen PPL
    of the method ÷ Gen PPL of the baseline with its 95 % interval (the two sets of samples resampled
    independently), the two-sided bootstrap p-value of "equal Gen PPL", ``significant`` (the interval
    excludes 1) and ``significant_holm`` (still so after Holm's correction over all these comparisons,
    family-wise error 5 %)."""
    rows = []
    for (method, steps), cell in sorted(cells.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        reference = cells.get((baseline, steps))
        if method != baseline and reference is not None and cell.nll is not None and reference.nll is not None:
            comparison = compare(cell.gen_ppl_statistic(), reference.gen_ppl_statistic(), kind="ratio")
            rows.append({"method": method, "baseline": baseline, "steps": steps, **comparison.as_dict()})
    for row, holds in zip(rows, holm_significant([row["p_value"] for row in rows])):
        row["significant_holm"] = holds
    return rows


def rank_block(n: int, rank: int, size: int) -> slice:
    """Contiguous block of ``n`` items for ``rank`` of ``size`` (sizes differ by at most one)."""
    return slice(n * rank // size, n * (rank + 1) // size)


def _gathered(values: Optional[Tensor], block: slice, n: int, dp_group, device) -> Optional[Tensor]:
    """This rank's block of per-sample values placed in a zero vector of all n samples, summed over ranks."""
    if values is None:
        return None
    full = torch.zeros(n, dtype=torch.float64)
    full[block] = values.to(torch.float64).cpu()
    return torch.tensor(all_reduce_float64(full.tolist(), dp_group, device), dtype=torch.float64)


def score_samples(rows: list[dict] | Tensor, oracle: Optional[Oracle], *, entropy: bool, dp_rank: int = 0,
                  dp_size: int = 1, dp_group=None, device: torch.device | str = "cpu",
                  batch_size: Optional[int] = None) -> SampleScores:
    """Per-sample oracle NLL, entropy and seconds of ``rows`` (dicts with ``tokens`` and optionally ``text``
    and ``seconds``, or a (N, L) tensor of token ids). ``batch_size``: the sampler's, whose batches are the
    consecutive sample indices that were timed together (``edlm sample``). Collective over ``dp_group``
    when torch.distributed is up; every rank returns every sample's values."""
    if isinstance(rows, Tensor):
        rows = [{"tokens": row} for row in rows.tolist()]
    n = len(rows)
    block = rank_block(n, dp_rank, dp_size)
    mine = rows[block]
    nll = tokens = entropies = None
    if oracle is not None:
        nll, tokens = oracle.score_rows(mine)
    if entropy:  # row by row: sample files may hold rows of different lengths
        entropies = torch.tensor([float(unigram_entropy_bits(torch.tensor(row["tokens"]))) for row in mine],
                                 dtype=torch.float64)
    seconds = None
    if any(isinstance(row.get("seconds"), (int, float)) for row in rows):  # NaN marks an untimed row
        seconds = torch.tensor([float(row["seconds"]) if isinstance(row.get("seconds"), (int, float)) else math.nan
                                for row in mine], dtype=torch.float64)
    batches = None
    if seconds is not None and batch_size:
        indices = [row["index"] if isinstance(row.get("index"), int) else i for i, row in enumerate(rows)]
        batches = torch.tensor(indices) // int(batch_size)
    return SampleScores(n, _gathered(nll, block, n, dp_group, device), _gathered(tokens, block, n, dp_group, device),
                        _gathered(entropies, block, n, dp_group, device), _gathered(seconds, block, n, dp_group, device),
                        oracle.name if oracle is not None else None, batches)


def score_sample_file(path: str | Path, oracle: Optional[Oracle], *, entropy: bool, dp_rank: int = 0,
                      dp_size: int = 1, dp_group=None,
                      device: torch.device | str = "cpu") -> tuple[dict, SampleScores]:
    """The settings that produced a sample file (method, steps, k, ...) and its per-sample scores."""
    rows = read_samples_jsonl(path)
    summary = read_sample_summary(path)
    settings = {"file": str(path), "method": method_name(summary, path),
                **{key: sampler_setting(summary, key) for key in SETTING_KEYS}}
    batch_size = sampler_setting(summary, "batch_size")
    scores = score_samples(rows, oracle, entropy=entropy, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group,
                           device=device, batch_size=batch_size if isinstance(batch_size, int) else None)
    return {**settings, "sampler_settings": summary}, scores


def file_metrics(settings: dict, scores: SampleScores) -> dict:
    """One sample file's row of metrics: its settings (from :func:`score_sample_file`), the aggregates of
    its scores with their intervals, and the sampler settings that produced it."""
    settings = dict(settings)
    sampler_settings = settings.pop("sampler_settings")
    return {**settings, **scores.summary(), "sampler_settings": sampler_settings}


def evaluate_sample_file(path: str | Path, oracle: Optional[Oracle], *, entropy: bool, dp_rank: int = 0,
                         dp_size: int = 1, dp_group=None, device: torch.device | str = "cpu") -> dict:
    """Metrics of one sample file with the sampler settings that produced it."""
    return file_metrics(*score_sample_file(path, oracle, entropy=entropy, dp_rank=dp_rank, dp_size=dp_size,
                                           dp_group=dp_group, device=device))


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
    scores = score_samples(rows, oracle, entropy=entropy, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group,
                           device=device)
    out = {"split": split, **scores.summary()}
    out.pop("seconds_per_sample", None)
    out.pop("seconds_per_sample_interval", None)
    if language is not None:
        rate, stderr = language.entropy_per_token()
        out.update(entropy_rate_nats=rate, entropy_rate_stderr=stderr, entropy_rate_ppl=math.exp(rate))
    return out
