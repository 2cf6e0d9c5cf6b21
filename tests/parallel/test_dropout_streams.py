"""Dropout streams on a TP=2 x DP=2 grid (issue 21, item 6): every rank starts from the same weights,
the two TP ranks of a replica draw the same masks outside TP regions (they work on one micro-batch),
and the two replicas draw different masks (or data parallelism averages identical dropout noise).

The reference is the layout itself: ranks are compared with each other, nothing is hard-coded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edlm_dist.config.load import load_config
from tests.spawn import run_on_ranks

pytestmark = pytest.mark.multirank

V, L = 37, 8
OVERRIDES = ["parallel.tp=2", "train.global_batch=16", "train.micro_batch=2", "model.hidden_size=32",
             "model.n_blocks=1", "model.n_heads=4", "model.cond_dim=16", "model.dropout=0.5"]


def _draws():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from edlm_dist.models.build import build_model
    from edlm_dist.models.tp_layers import gather_vocab_logits
    from edlm_dist.parallel.runtime import identical_on_every_rank, init_parallel
    from edlm_dist.parallel.sharded_state import full_state_dict
    from tests.models.model_helpers import randomise_weights

    cfg = load_config(None, OVERRIDES)
    ctx = init_parallel(cfg)
    with identical_on_every_rank(cfg.train.seed, ctx.device):  # what the trainer does around the model build
        model = build_model("dit", cfg.model, V, L, device=ctx.device)
    initial = full_state_dict(model)
    randomise_weights(model, seed=4)  # nonzero output layer: dropout shows in the logits
    model.train()
    tokens = (torch.arange(2 * L) % V).reshape(2, L).to(ctx.device)
    logits = gather_vocab_logits(model(tokens, None), V).detach()
    default = F.dropout(torch.ones(512, device=ctx.device), 0.5)
    with get_cuda_rng_tracker().fork():  # the stream of dropout inside TP regions
        region = F.dropout(torch.ones(512, device=ctx.device), 0.5)
    return {"tp": ctx.tp_rank, "dp": ctx.dp_rank, "initial": initial, "logits": logits.cpu(),
            "default": default.cpu(), "region": region.cpu()}


def test_tp_peers_share_dropout_and_dp_replicas_do_not():
    rows = {(r["dp"], r["tp"]): r for r in run_on_ranks(_draws, 4)}
    first = rows[(0, 0)]["initial"]
    for row in rows.values():
        assert all(torch.equal(row["initial"][k], first[k]) for k in first)  # same model on every rank
    for dp in (0, 1):
        a, b = rows[(dp, 0)], rows[(dp, 1)]
        assert torch.equal(a["default"], b["default"])  # TP peers: one replica, one mask
        assert torch.equal(a["logits"], b["logits"])
        assert not torch.equal(a["region"], b["region"])  # inside TP regions each shard has its own
    for tp in (0, 1):
        a, b = rows[(0, tp)], rows[(1, tp)]
        assert not torch.equal(a["default"], b["default"])  # DP replicas: different masks
        assert not torch.equal(a["region"], b["region"])
        assert not torch.equal(a["logits"], b["logits"])
