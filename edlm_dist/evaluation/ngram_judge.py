"""An independent Gen-PPL judge for real text: an interpolated Kneser-Ney n-gram model of token ids.

On real text there is no exact oracle, and the obvious local one, an AR model exported from our own
run, is EDLM's energy: scoring EDLM's samples with it is circular. The judge here is another model
family, fitted on **held-out text only** (the validation split, which no model trains on), so it
agrees with neither the diffusion model nor the energy by construction.

Model (Chen & Goodman 1999, "An empirical study of smoothing techniques", interpolated Kneser-Ney
with one discount per order, Ney et al.'s estimate ``D = n1 / (n1 + 2 n2)``)::

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .)  +  D_k N1+(h .) / c_k(h .) * P_{k-1}(w | h')
    P_0(w)     = 1 / V

``h`` is the last ``k - 1`` tokens, ``h'`` drops its first one. ``c_n`` counts n-grams; the lower
orders count continuations ``N1+(. h w)`` (how many different tokens precede ``h w``). A context never
seen falls back to the next order (``P_k = P_{k-1}``). Each ``P_k(. | h)`` sums to one over the ``V``
model ids, which the tests check by enumeration. Rows are padded on the left with ``n - 1`` start
symbols; the first token of a row (always ``[BOS]``) is given, the others are scored, as in the HF
Gen-PPL convention where the first token of a chunk is unscored.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import torch
from torch import Tensor

from edlm_dist.errors import ConfigError, DataError

START = -1  # left padding: never a model id


class KneserNeyJudge:
    """Interpolated Kneser-Ney n-gram model over ids ``0 .. vocab_size - 1`` (see the module docstring)."""

    def __init__(self, order: int, vocab_size: int):
        if order < 1 or vocab_size < 1:
            raise ConfigError(f"an n-gram judge needs order >= 1 and vocab_size >= 1, got {order} and {vocab_size}")
        self.order, self.vocab_size = int(order), int(vocab_size)
        self.discount = [0.0] * (self.order + 1)
        self.counts: list[dict[tuple, int]] = [{} for _ in range(self.order + 1)]  # [k][(h..., w)]
        self.context_total: list[dict[tuple, int]] = [{} for _ in range(self.order + 1)]
        self.context_types: list[dict[tuple, int]] = [{} for _ in range(self.order + 1)]
        self.fitted_tokens = 0
        self.name = f"kneser-ney {self.order}-gram (held-out text)"

    def _padded(self, row: Sequence[int]) -> tuple[int, ...]:
        return (START,) * (self.order - 1) + tuple(int(t) for t in row)

    def fit(self, rows: Iterable[Sequence[int]]) -> "KneserNeyJudge":
        """Count the n-grams of ``rows`` (held-out text only) and set the discounts."""
        n = self.order
        top: Counter = Counter()
        for row in rows:
            padded = self._padded(row)
            for i in range(n - 1 + 1, len(padded)):  # every scored position (the row's first token is given)
                top[padded[i - n + 1 : i + 1]] += 1
            self.fitted_tokens += max(len(row) - 1, 0)
        if not top:
            raise DataError("the n-gram judge got no held-out text to fit; use a validation split of 2+ tokens per row")
        self.counts[n] = dict(top)
        for k in range(n - 1, 0, -1):  # continuation counts: distinct left neighbours of each k-gram
            lower: Counter = Counter(gram[1:] for gram in self.counts[k + 1])
            self.counts[k] = dict(lower)
        for k in range(1, n + 1):
            total: dict[tuple, int] = defaultdict(int)
            types: dict[tuple, int] = defaultdict(int)
            for gram, count in self.counts[k].items():
                total[gram[:-1]] += count
                types[gram[:-1]] += 1
            self.context_total[k], self.context_types[k] = dict(total), dict(types)
            of_count = Counter(min(c, 3) for c in self.counts[k].values())
            n1, n2 = of_count[1], of_count[2]
            self.discount[k] = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
        return self

    def prob(self, history: Sequence[int], token: int) -> float:
        """``P_n(token | the last n - 1 ids of history)``; the history may include start symbols."""
        history = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        p = 1.0 / self.vocab_size
        for k in range(1, self.order + 1):
            context = history[len(history) - (k - 1):] if k > 1 else ()
            total = self.context_total[k].get(context, 0)
            if total == 0:
                continue  # unseen context: this order adds nothing, P_k = P_{k-1}
            d = self.discount[k]
            count = self.counts[k].get(context + (token,), 0)
            p = max(count - d, 0.0) / total + d * self.context_types[k][context] / total * p
        return p

    def row_nll(self, row: Sequence[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of the row's tokens after the first, and their number."""
        padded = self._padded(row)
        nll = 0.0
        for i in range(self.order, len(padded)):
            token = padded[i]
            if not 0 <= token < self.vocab_size:
                raise DataError(f"token id {token} is outside the judge's vocabulary [0, {self.vocab_size})")
            nll -= math.log(self.prob(padded[i - self.order + 1 : i], token))
        return nll, max(len(row) - 1, 0)

    def score_rows(self, rows: list[dict]) -> tuple[Tensor, Tensor]:
        """The Gen-PPL oracle interface: per sample row (``{"tokens": [...]}``), NLL in nats summed over its
        scored tokens and their number, float64 (n,) each."""
        scored = [self.row_nll(row["tokens"]) for row in rows]
        return (torch.tensor([nll for nll, _ in scored], dtype=torch.float64),
                torch.tensor([count for _, count in scored], dtype=torch.float64))

    def gen_ppl(self, rows: Iterable[Sequence[int]]) -> float:
        """exp(total NLL / total scored tokens): the token-weighted Gen PPL of ``rows`` under the judge."""
        nll, count = 0.0, 0
        for row in rows:
            a, b = self.row_nll(row)
            nll, count = nll + a, count + b
        if count == 0:
            raise DataError("no tokens to score: every row is shorter than 2 tokens")
        return math.exp(nll / count)

    def describe(self) -> dict:
        return {"kind": "kneser-ney n-gram", "order": self.order, "vocab_size": self.vocab_size,
                "fitted_tokens": self.fitted_tokens, "discounts": self.discount[1:]}
