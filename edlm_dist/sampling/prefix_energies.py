"""Energies of block proposals against a committed prefix (block-wise EDLM, sampling/blocks.py).

A *prefix session* lives for one batch of rows. Before block [lo, hi) runs, :meth:`block` is called once
with the rows' current state; it returns a row-aware scorer ``(x0_block, x_t_block, log_mu_block, t,
rows=) -> energies`` used by every step of the block. Only the block's terms are computed: the prefix's
terms are one constant per row, which the importance weights ignore (docs/sampling.md, "Block-wise").

* :class:`ARPrefixSession` (AR and coAR energies, paper Eq. 9). The committed prefix sits in ONE KV cache
  of the AR model (models/kv_cache.py) for all rows of the batch, extended once per block by the newly
  committed tokens (b tokens per row, one model call) and read in place by all k proposals of every step
  of the block. Position lo's log-probability comes from the prefix's last position; a proposal costs b
  AR tokens instead of hi (tested equal to the full recomputation to float32 tolerance at TP=1 and
  TP=2). Feeding the whole proposal also yields its keys/values and log p_AR of the next token, so when
  the committed block is one of the proposals scored last (the usual case: the block's last IS step
  reveals the chosen proposal whole), it joins the cache by a copy (``KVCache.adopt``) instead of the
  extension call. ``cached=False`` recomputes prefix + block per proposal (the reference point). One
  block of the whole row runs the whole-row energy's own forward, so it gives today's energies bit for bit.
* :class:`OraclePrefixSession`: ``-log p_true(prefix, block) + log q`` with the language's exact prefix
  marginal.

Each session counts ``calls`` (prefix extensions), ``score_calls`` (scoring calls that ran the model; the
sequential model calls are their sum) and ``tokens`` (model tokens it processed, padding included).
"""

from __future__ import annotations

import torch

from edlm_dist.sampling.chunking import rows_per_forward
from edlm_dist.sampling.energies import oracle_energy
from edlm_dist.sampling.engine import LocalProposals


class ARPrefixSession:
    """The AR energy's view of one batch for block-wise sampling (module docstring)."""

    def __init__(self, energy, length: int, *, cached: bool = True, exchange=None):
        self.energy, self.length, self.cached = energy, int(length), bool(cached)
        self.exchange = exchange or LocalProposals()  # the ranks of a proposal group share committed blocks
        self.cache = None  # the AR model's KVCache over every row of the batch, positions [0, filled)
        self.filled = 0
        self.next_log_probs = None  # (B, V): log p_AR(x^filled = . | x^{<filled}) of every row
        self.scored = {}  # batch row -> (child cache, its rows, block tokens, log p of the next token): last scoring
        self.calls = 0  # prefix extensions (model calls)
        self.score_calls = 0  # scoring calls that ran the model
        self.adopted = 0  # blocks committed from scored proposals, without an extension call
        self.tokens = 0

    def block(self, x: torch.Tensor, lo: int, hi: int, todo: torch.Tensor):
        """The scorer of block [lo, hi) for the batch rows ``todo``; ``x`` (B, L) holds the committed prefix."""
        if not self.cached or (lo == 0 and hi == self.length):  # one block of the whole row: today's forward
            return _RecomputedBlockScorer(self, x[todo, :lo])
        if self.cache is None:
            self.cache = self.energy.model.new_cache(self.length)
        if lo > self.filled and not self._adopt(x, lo):  # commit [filled, lo): one call of lo - filled tokens
            chunk = x[:, self.filled:lo]
            log_probs = self.energy.model.log_probs(chunk, self.energy.mask_id, cache=self.cache, append=True,
                                                    last_only=True)
            self.next_log_probs = log_probs[:, -1]
            self.calls += 1
            self.tokens += chunk.numel()
        self.filled = lo
        self.scored = {}
        return _CachedBlockScorer(self, todo.to(x.device), lo, hi)

    def _adopt(self, x: torch.Tensor, lo: int) -> bool:
        """Commit [filled, lo) from scored proposals: each row's committed tokens must be one of the proposals
        some rank of the proposal group scored last for it (the usual case: the block's last IS step revealed
        the chosen proposal whole). Rows this rank scored are copied from its own cache; the others arrive
        from the rank that has them (one broadcast per such rank, ``exchange.broadcast_rows``)."""
        count, batch, model = lo - self.filled, x.shape[0], self.energy.model
        local = {}
        for row, (child, child_rows, tokens, last) in self.scored.items():
            match = (tokens == x[row, self.filled:lo]).all(dim=1).nonzero().flatten() if tokens.shape[1] == count \
                else tokens.new_empty(0)
            if len(match):
                local[row] = (child, int(child_rows[match[0]]), last[match[0]])
        have = torch.zeros(batch, dtype=torch.bool, device=x.device)
        have[list(local)] = True
        owners = self.exchange.row_owners(have)  # collective: every rank takes the same branch below
        if bool((owners < 0).any()):
            return False
        block = model.blocks[0]
        layers, heads, head_dim = len(model.blocks), block.local_heads, block.head_dim
        if not self.cache.keys:
            self.cache.allocate(batch, layers, heads, head_dim, x.new_empty(0, dtype=torch.float32))
        next_log_probs = x.new_empty((batch, model.vocab_size), dtype=torch.float32)

        def gathered(rows: list[int]):
            """keys, values (per layer, (R, heads, count, d)) and next-token log-probs (R, V) of ``rows``, in
            order, read from the children that scored them (one gather per child)."""
            keys = [x.new_empty((len(rows), heads, count, head_dim), dtype=torch.float32) for _ in range(layers)]
            values = [torch.empty_like(k) for k in keys]
            last = x.new_empty((len(rows), model.vocab_size), dtype=torch.float32)
            by_child = {}
            for n, row in enumerate(rows):
                child, child_row, log_probs = local[row]
                by_child.setdefault(id(child), (child, [], [], []))
                by_child[id(child)][1].append(n)
                by_child[id(child)][2].append(child_row)
                by_child[id(child)][3].append(log_probs)
            for child, slots, child_rows, lasts in by_child.values():
                slots_t = torch.tensor(slots, device=x.device)
                child_k, child_v = child.scored_chunk(torch.tensor(child_rows, device=x.device), count)
                for layer in range(layers):
                    keys[layer][slots_t], values[layer][slots_t] = child_k[layer], child_v[layer]
                last[slots_t] = torch.stack(lasts)
            return keys, values, last

        mine = (owners == self.exchange.rank).nonzero().flatten()
        if len(mine):
            keys, values, last = gathered(mine.tolist())
            self.cache.adopt(mine, keys, values)
            next_log_probs[mine] = last
        per_row = 2 * layers * heads * count * head_dim + model.vocab_size

        def pack(rows):  # layer-major: every layer's keys, then values, then the log-probs, each (R, ...)
            keys, values, last = gathered(rows.tolist())
            return torch.cat([t.flatten() for t in keys + values] + [last.flatten()])

        def unpack(rows, flat):
            size = len(rows) * heads * count * head_dim
            parts = [flat[i * size : (i + 1) * size].view(len(rows), heads, count, head_dim) for i in range(2 * layers)]
            self.cache.adopt(rows, parts[:layers], parts[layers:])
            next_log_probs[rows] = flat[2 * layers * size :].view(len(rows), model.vocab_size)

        self.exchange.broadcast_rows(owners, per_row, pack, unpack)
        self.cache.advance(count)
        self.next_log_probs = next_log_probs
        self.adopted += 1
        return True


    def first_token_log_probs(self, lo: int, todo: torch.Tensor):
        """(R, V) log p_AR(x^lo = . | committed prefix) of the rows ``todo``, as the cache holds it (None before
        the first commit): a free, exact proposal for a block's first token (``block_proposal=ar_first``)."""
        if self.next_log_probs is None or lo != self.filled or lo == 0:
            return None
        return self.next_log_probs[todo.to(self.next_log_probs.device)]


class _RecomputedBlockScorer:
    """log p_AR of the block from one forward over [prefix, block] per proposal (no cache)."""

    needs_rows = True

    def __init__(self, session: ARPrefixSession, prefix: torch.Tensor):
        self.session, self.prefix, self.lo = session, prefix, prefix.shape[1]

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        energy = self.session.energy
        rows_in = torch.cat([self.prefix[rows.to(self.prefix.device)], x0], dim=1) if self.lo else x0
        self.session.tokens += rows_in.numel()
        self.session.score_calls += 1
        log_p = energy.token_log_probs(rows_in)[:, self.lo:]
        return energy.block_energy(log_p, log_mu_tokens, x_t, start=self.lo)


class _CachedBlockScorer:
    """log p_AR of the block against the session's prefix cache: proposals of a row share its cached prefix.

    Each proposal is fed whole (b tokens): its outputs give the block's log-probabilities after the first
    (which comes from the prefix's last position) and, at the last position, log p_AR of the token after the
    block, so a proposal that gets committed can join the prefix cache without another call."""

    needs_rows = True

    def __init__(self, session: ARPrefixSession, todo: torch.Tensor, lo: int, hi: int):
        self.session, self.todo, self.lo, self.hi = session, todo, lo, hi

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        session, energy = self.session, self.session.energy
        parent = self.todo[rows.to(self.todo.device)]  # the batch row of each proposal
        width = x0.shape[1]
        log_p = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
        if self.lo > 0:
            log_p[:, 0] = session.next_log_probs[parent].gather(-1, x0[:, :1]).squeeze(-1)
        # The cache shares a prefix among G proposals per row: group the proposals by row, pad each group to
        # the largest one with copies of its first proposal (scored, then dropped).
        order = torch.argsort(parent, stable=True)
        owners, counts = torch.unique_consecutive(parent[order], return_counts=True)
        group = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        owner_index = torch.repeat_interleave(torch.arange(len(owners), device=x0.device), counts)
        slot = torch.arange(len(order), device=x0.device) - starts[owner_index]
        padded = x0[order[starts]].unsqueeze(1).repeat(1, group, 1)  # (R, G, b)
        padded[owner_index, slot] = x0[order]
        scored = torch.empty((len(owners), group, width - 1), dtype=torch.float32, device=x0.device)
        per_chunk = rows_per_forward(x0.device, group * width, len(owners))
        for start in range(0, len(owners), per_chunk):
            part = slice(start, min(len(owners), start + per_chunk))
            tokens = padded[part].reshape(-1, width)
            child = session.cache.share(group=group, capacity=self.hi, rows=owners[part])
            fed = tokens if self.hi < session.length else tokens[:, :-1]  # the row's last token predicts nothing
            if fed.shape[1]:
                lp = energy.model.log_probs(fed, energy.mask_id, cache=child, append=False)
                picked = lp[:, : width - 1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
                scored[part] = picked.reshape(part.stop - part.start, group, width - 1)
                session.tokens += fed.numel()
                if fed.shape[1] == width:  # keep what committing one of these proposals needs
                    for r, owner in enumerate(owners[part].tolist()):
                        members = torch.arange(r * group, (r + 1) * group, device=x0.device)
                        session.scored[owner] = (child, members, tokens[members], lp[members, -1])
        if width > 1:
            log_p[order, 1:] = scored[owner_index, slot]
        session.score_calls += 1
        return energy.block_energy(log_p, log_mu_tokens, x_t, start=self.lo)


class OraclePrefixSession:
    """The exact energy of block proposals: the language's marginal of prefix + block (no model calls)."""

    calls = score_calls = tokens = 0

    def __init__(self, language):
        self.language = language

    def block(self, x: torch.Tensor, lo: int, hi: int, todo: torch.Tensor):
        return _OracleBlockScorer(self.language, x[todo, :lo])


class _OracleBlockScorer:
    needs_rows = True

    def __init__(self, language, prefix: torch.Tensor):
        self.language, self.prefix = language, prefix

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        rows_in = torch.cat([self.prefix[rows.to(self.prefix.device)], x0], dim=1)
        log_p_true = self.language.prefix_log_prob(rows_in.cpu()).to(x0.device)
        return oracle_energy(log_p_true, log_mu_tokens.to(torch.float64)).to(torch.float64)
