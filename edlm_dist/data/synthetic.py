"""The exact-oracle synthetic language (docs/synthetic_language.md).

A document (one row of length L) is generated as
    z ~ Uniform{0..K-1}                               (latent topic, fixed for the whole row)
    x_0 = BOS,  x_{L-1} = EOS                          (MDLM framing, spec §1.2)
    x_t ~ p_z(. | x_{t-r} .. x_{t-1}),  t = 1..L-2     (order-r Markov chain of topic z)
with positions t-r < 1 of the context reading BOS. Each topic's chain is sparse: every context c
allows only ``branching`` next tokens A_z(c) with Dirichlet(concentration) weights q_z(.|c), and
is smoothed so that every row has a finite log-likelihood:
    p_z(v | c) = (1 - eps) * q_z(v | c) + eps / n.
Hence log p(x) = logsumexp_z [ log(1/K) + sum_t log p_z(x_t | c_t) ] exactly (framing: log 1).

Rows outside the support (a wrong id at position 0 or L-1, or a special/mask id inside) get a
finite penalty log(eps / n) per offending position; inside, such an id is read as BOS in later
contexts. That score is not a normalised probability, only a finite "very unlikely" value.

The entropy H(X) = H(X|Z) + H(Z) - H(Z|X) is computed with H(X|Z) exact (forward propagation of
the context distribution), H(Z) = log K, and H(Z|X) by Monte Carlo (Rao-Blackwellised over the
topic posterior) with a stated standard error.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.tokenizers import SyntheticTokenizer
from edlm_dist.errors import ConfigError, DataError

MAX_TABLE_ENTRIES = 20_000_000  # contexts x num_tokens while building one topic's table
DENSE_TABLE_MAX_ENTRIES = 1 << 22  # K x contexts x num_tokens log-probs kept dense (32 MiB) below this
ENTROPY_BATCH_ROWS = 4096
ENTROPY_MAX_ROWS = 65536
ENTROPY_TARGET_REL_STDERR = 1e-3


def _validate(cfg: SyntheticConfig, seq_len: int) -> None:
    checks = [
        (cfg.num_tokens >= 2, f"num_tokens must be >= 2, got {cfg.num_tokens}"),
        (cfg.num_topics >= 1, f"num_topics must be >= 1, got {cfg.num_topics}"),
        (cfg.order >= 1, f"order must be >= 1, got {cfg.order}"),
        (1 <= cfg.branching <= cfg.num_tokens, f"branching must be in [1, num_tokens={cfg.num_tokens}], "
                                                f"got {cfg.branching}"),
        (cfg.concentration > 0, f"concentration must be > 0, got {cfg.concentration}"),
        (0 < cfg.smoothing < 1, f"smoothing must be in (0, 1) so that log p stays finite, got {cfg.smoothing}"),
        (seq_len >= 3, f"seq_len must be >= 3 (BOS + at least one token + EOS), got {seq_len}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"data.synthetic: {message}; fix: change the config")
    contexts = (cfg.num_tokens + 1) ** cfg.order
    if contexts * cfg.num_tokens > MAX_TABLE_ENTRIES:
        raise ConfigError(f"data.synthetic: (num_tokens+1)^order * num_tokens = {contexts * cfg.num_tokens} "
                          f"exceeds {MAX_TABLE_ENTRIES}; fix: lower num_tokens or order")


def build_tables(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse transition tables from ``cfg.seed``: ``allowed`` (K, C, b) long, distinct next tokens per
    context, and ``weights`` (K, C, b) float64, Dirichlet(concentration) weights q_z(v|c) summing to 1.
    Context c of tokens (s_1..s_r) in {0..n} (n = BOS) is sum_j s_j (n+1)^(r-j)."""
    n, b, K = cfg.num_tokens, cfg.branching, cfg.num_topics
    contexts = (n + 1) ** cfg.order
    rng = np.random.default_rng(cfg.seed)
    allowed = np.empty((K, contexts, b), dtype=np.int64)
    for k in range(K):
        # A uniformly random b-subset per context: the b smallest of n i.i.d. uniform keys.
        keys = rng.random((contexts, n))
        allowed[k] = np.argpartition(keys, b - 1, axis=1)[:, :b] if b < n else np.argsort(keys, axis=1)
    weights = rng.dirichlet(np.full(b, float(cfg.concentration)), size=(K, contexts))
    return torch.from_numpy(allowed), torch.from_numpy(weights)


class SyntheticLanguage:
    """A seeded mixture of K sparse order-r Markov chains with exact log-likelihood (module docstring)."""

    def __init__(self, cfg: SyntheticConfig, seq_len: int):
        _validate(cfg, seq_len)
        self.cfg = cfg
        self.seq_len = int(seq_len)
        self.tokenizer = SyntheticTokenizer(cfg.num_tokens)
        self.num_tokens = cfg.num_tokens
        self.vocab_size = self.tokenizer.vocab_size
        self.bos_id, self.eos_id, self.mask_id = self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.mask_id
        self.num_topics, self.order, self.branching = cfg.num_topics, cfg.order, cfg.branching
        self.smoothing = float(cfg.smoothing)
        self.base = self.num_tokens + 1  # context alphabet: real tokens + BOS (= id num_tokens)
        self.num_contexts = self.base ** self.order
        self.start_context = sum(self.bos_id * self.base ** j for j in range(self.order))  # (BOS, .., BOS)
        self.allowed, self.weights = build_tables(cfg)
        self.floor_prob = self.smoothing / self.num_tokens  # p_z(v|c) of a token outside A_z(c)
        self.penalty = math.log(self.floor_prob)  # per invalid position (wrong framing, special inside)
        self.sparse_probs = (1.0 - self.smoothing) * self.weights  # the sparse part of p_z(.|c)
        self.log_topic_prior = torch.full((self.num_topics,), -math.log(self.num_topics), dtype=torch.float64)
        self.num_scored_tokens = self.seq_len - 1  # every position after BOS, like the AR loss (spec §2.2)
        self._entropy: dict | None = None
        self._dense_log_probs = None
        if self.num_topics * self.num_contexts * self.num_tokens <= DENSE_TABLE_MAX_ENTRIES:
            dense = torch.full((self.num_topics, self.num_contexts, self.num_tokens), math.log(self.floor_prob),
                               dtype=torch.float64)
            self._dense_log_probs = dense.scatter_(2, self.allowed, (self.sparse_probs + self.floor_prob).log())

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` independent framed rows (n, seq_len), int64, drawn with ``generator`` only."""
        K, b = self.num_topics, self.branching
        topic = torch.randint(K, (n,), generator=generator)
        rows = torch.empty((n, self.seq_len), dtype=torch.long)
        rows[:, 0], rows[:, -1] = self.bos_id, self.eos_id
        context = torch.full((n,), self.start_context, dtype=torch.long)
        cumulative = self.weights.cumsum(-1)
        drop_oldest = self.base ** (self.order - 1)
        for t in range(1, self.seq_len - 1):
            smooth = torch.rand(n, generator=generator, dtype=torch.float64) < self.smoothing
            uniform_token = torch.randint(self.num_tokens, (n,), generator=generator)
            u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
            # Inverse CDF over the b allowed tokens; clamp guards the last cumsum being 1 - 1ulp.
            slot = (u >= cumulative[topic, context]).sum(-1).clamp_(max=b - 1)
            sparse_token = self.allowed[topic, context, slot]
            token = torch.where(smooth, uniform_token, sparse_token)
            rows[:, t] = token
            context = (context % drop_oldest) * self.base + token
        return rows

    # ------------------------------------------------------------------ scoring
    def _check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != self.seq_len:
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise DataError(f"rows must be a (n, {self.seq_len}) integer tensor, got {shape}; "
                            "fix: pass rows of this language's seq_len")
        if rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise DataError(f"rows must hold integer token ids, got dtype {rows.dtype}; fix: pass a LongTensor")
        rows = rows.long().cpu()
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.vocab_size):
            raise DataError(f"token ids must lie in [0, {self.vocab_size}), got range "
                            f"[{int(rows.min())}, {int(rows.max())}]; fix: score rows of this language's vocabulary")
        return rows

    def _score(self, rows: torch.Tensor, upto: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x, z) for every topic (n, K), penalty (n,)) — log p(x) = logsumexp + penalty.

        ``upto`` = m < L scores only positions < m (the marginal of the first m tokens; later positions
        of ``rows`` are ignored)."""
        rows = self._check_rows(rows)
        n, L = rows.shape
        upto = L if upto is None else upto
        body = rows[:, 1:L - 1]
        in_prefix = torch.arange(1, L - 1) < upto
        valid = (body < self.num_tokens) & in_prefix
        penalty = (rows[:, 0] != self.bos_id).double() + (rows[:, L - 1] != self.eos_id).double() * (upto == L)
        penalty = (penalty + ((body >= self.num_tokens) & in_prefix).sum(1).double()) * self.penalty
        # Context tokens: BOS before the first language token; invalid inner ids read as BOS.
        tokens = torch.where(valid, body, torch.full_like(body, self.bos_id))
        padded = torch.cat([torch.full((n, self.order), self.bos_id, dtype=torch.long), tokens[:, :-1]], 1)
        powers = self.base ** torch.arange(self.order - 1, -1, -1)
        context = (padded.unfold(1, self.order, 1) * powers).sum(-1)  # (n, L-2): tokens t-r .. t-1
        target = torch.where(valid, body, torch.zeros_like(body))
        token_log_probs = self._token_log_probs(context, target)  # (K, n, L-2)
        log_joint = self.log_topic_prior + (token_log_probs * valid).sum(-1).T
        return log_joint, penalty

    def _token_log_probs(self, context: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """log p_z(token | context) for every topic z: (K, *context.shape), float64."""
        if self._dense_log_probs is not None:  # one flat gather; fast path for small languages
            flat_topic = torch.arange(self.num_topics).view(-1, *([1] * context.dim())) * self.num_contexts
            index = (flat_topic + context) * self.num_tokens + token
            return self._dense_log_probs.view(-1)[index]
        out = []
        for k in range(self.num_topics):  # sparse path: compare with the b allowed tokens
            hit = self.allowed[k][context] == token.unsqueeze(-1)  # at most one True (distinct tokens)
            out.append(((hit * self.sparse_probs[k][context]).sum(-1) + self.floor_prob).log())
        return torch.stack(out)

    def log_prob(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact log p(row) in float64, shape (n,); finite for any ids in [0, vocab_size)."""
        self._check_rows(rows)  # whole rows only (prefix_log_prob takes shorter ones)
        return self.prefix_log_prob(rows)

    def prefix_log_prob(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Exact marginal log p(x_0 .. x_{m-1}) of (n, m) prefixes, 1 <= m <= seq_len, float64 (n,): the sum over
        every continuation (the chains' terms stop at position m - 1). m = seq_len is :meth:`log_prob`."""
        if not isinstance(prefixes, torch.Tensor) or prefixes.dim() != 2 or not 1 <= prefixes.shape[1] <= self.seq_len:
            shape = tuple(prefixes.shape) if isinstance(prefixes, torch.Tensor) else type(prefixes).__name__
            raise DataError(f"prefixes must be (n, m) with 1 <= m <= {self.seq_len}, got {shape}; fix: pass the "
                            "first m tokens of rows of this language")
        m = prefixes.shape[1]
        rows = prefixes
        if m < self.seq_len:  # any in-vocabulary filler: positions >= m are not scored
            rows = torch.cat([prefixes, prefixes.new_zeros((prefixes.shape[0], self.seq_len - m))], dim=1)
        log_joint, penalty = self._score(rows, upto=m)
        return torch.logsumexp(log_joint, dim=1) + penalty

    def per_token_nll(self, rows: torch.Tensor) -> torch.Tensor:
        """-log p(row) / num_scored_tokens (= seq_len - 1, every position after BOS), float64 (n,)."""
        return -self.log_prob(rows) / self.num_scored_tokens

    def topic_posterior(self, rows: torch.Tensor) -> torch.Tensor:
        """p(z | row) for every topic, float64 (n, K)."""
        log_joint, _ = self._score(rows)
        return torch.softmax(log_joint, dim=1)

    # ------------------------------------------------------------------ exact marginal quantities
    def _forward_pass(self) -> tuple[float, float]:
        """Exact H(X|Z) and sum_t H(m_t) (m_t = marginal of position t) for one row, in nats.

        Propagates the distribution mu_z(c) of the context before each language position; the
        next-token entropy per context is H_z(c) = -sum_v p_z(v|c) log p_z(v|c)."""
        K, C, n, b = self.num_topics, self.num_contexts, self.num_tokens, self.branching
        eps_n = self.floor_prob
        p_allowed = self.sparse_probs + eps_n
        h_context = -(p_allowed * p_allowed.log()).sum(-1) - (n - b) * eps_n * math.log(eps_n)  # (K, C)
        prior = self.log_topic_prior.exp()
        suffix = torch.arange(C) % (self.base ** (self.order - 1))
        successor = (suffix.view(1, C, 1) * self.base + self.allowed).view(K, C * b)
        mu = torch.zeros(K, C, dtype=torch.float64)
        mu[:, self.start_context] = 1.0
        h_given_topic, h_marginals = 0.0, 0.0
        for _ in range(self.seq_len - 2):
            h_given_topic += float((prior * (mu * h_context).sum(1)).sum())
            flow = (mu.unsqueeze(-1) * self.sparse_probs).view(K, C * b)  # sparse mass per successor
            marginal = torch.zeros(K, n, dtype=torch.float64).scatter_add_(1, self.allowed.view(K, C * b), flow)
            marginal = (prior.unsqueeze(1) * (marginal + eps_n)).sum(0)  # sum_c mu(c) = 1 per topic
            h_marginals += float(-(marginal * marginal.log()).sum())
            new_mu = torch.zeros(K, C, dtype=torch.float64).scatter_add_(1, successor, flow)
            # Smoothing mass eps/n of every context goes to (suffix, v) for every real v.
            smooth = torch.zeros(K, C // self.base, dtype=torch.float64).scatter_add_(
                1, suffix.expand(K, C), mu * eps_n)
            new_mu.view(K, C // self.base, self.base)[:, :, :n] += smooth.unsqueeze(-1)
            mu = new_mu
        return h_given_topic, h_marginals

    def entropy_terms(self) -> dict:
        """H(X) = H(X|Z) + H(Z) - H(Z|X) per row in nats, with H(Z|X) by Monte Carlo (cached).

        Keys: h_given_topic, h_topic, h_topic_given_x, h_topic_given_x_stderr, h_row, h_row_stderr,
        factorised_nll (sum over positions of the entropy of each position's marginal), rows_used."""
        if self._entropy is not None:
            return dict(self._entropy)
        h_given_topic, h_marginals = self._forward_pass()
        h_topic = float(-(self.log_topic_prior.exp() * self.log_topic_prior).sum())
        # Fixed seed: the estimate is a deterministic function of the language.
        generator = torch.Generator().manual_seed(self.cfg.seed + 7919)
        posterior_entropies = []
        while True:
            post = self.topic_posterior(self.sample(ENTROPY_BATCH_ROWS, generator))
            posterior_entropies.append(-(post * post.clamp_min(1e-300).log()).sum(1))
            values = torch.cat(posterior_entropies)
            mean, stderr = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
            h_row = h_given_topic + h_topic - mean
            if stderr <= ENTROPY_TARGET_REL_STDERR * h_row or values.numel() >= ENTROPY_MAX_ROWS:
                break
        self._entropy = {"h_given_topic": h_given_topic, "h_topic": h_topic, "h_topic_given_x": mean,
                         "h_topic_given_x_stderr": stderr, "h_row": h_row, "h_row_stderr": stderr,
                         "factorised_nll": h_marginals, "rows_used": values.numel()}
        return dict(self._entropy)

    def entropy_per_token(self) -> tuple[float, float]:
        """(entropy, standard error) in nats per scored token (H(X) / (seq_len - 1))."""
        terms = self.entropy_terms()
        return terms["h_row"] / self.num_scored_tokens, terms["h_row_stderr"] / self.num_scored_tokens

    def factorised_nll_per_token(self) -> float:
        """Exact NLL per scored token of the best fully factorised model (product of the true
        per-position marginals): what a denoiser that unmasks every position at once can reach."""
        return self.entropy_terms()["factorised_nll"] / self.num_scored_tokens

    # ------------------------------------------------------------------ manifests
    def state_dict(self) -> dict:
        """Defining parameters (the tables are rebuilt from the seed; their hash detects RNG drift)."""
        digest = hashlib.sha256(self.allowed.numpy().tobytes() + self.weights.numpy().tobytes()).hexdigest()
        language = {k: v for k, v in asdict(self.cfg).items() if k not in ("train_rows", "valid_rows")}
        return {"kind": "mixture_of_sparse_markov_chains", **language, "seq_len": self.seq_len,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "mask_id": self.mask_id, "num_scored_tokens": self.num_scored_tokens, "tables_sha256": digest}

    def describe(self) -> dict:
        return self.state_dict()


def language_from_manifest(manifest: dict) -> Optional[SyntheticLanguage]:
    """The language that generated a prepared data folder (its ``manifest.json`` as a dict); None when the
    data is not synthetic. A rebuilt language whose tables hash differs from the recorded one is a DataError
    (the generator changed since the data was prepared)."""
    source = manifest.get("source") or {}
    if source.get("name") != "synthetic" or not isinstance(source.get("config"), dict):
        return None
    known = SyntheticConfig.__dataclass_fields__
    language = SyntheticLanguage(SyntheticConfig(**{k: v for k, v in source["config"].items() if k in known}),
                                 int(manifest["seq_len"]))
    recorded = (source.get("language") or {}).get("tables_sha256")
    if recorded and language.describe()["tables_sha256"] != recorded:
        raise DataError("the synthetic language rebuilt from the data manifest differs from the one that generated "
                        "the data (tables hash mismatch); re-run `edlm prepare-data --source synthetic` with this "
                        "edlm-dist version")
    return language
