"""Megatron process groups on gloo, and a TP=2 Column->Row pair against a dense computation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from edlm_dist.config.load import load_config
from tests.spawn import run_on_ranks
from tests.tolerances import assert_close_across

pytestmark = pytest.mark.multirank


def _collectives(tp: int):
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, [f"parallel.tp={tp}", "train.global_batch=16", "train.micro_batch=2"]))
    value = torch.tensor([float(ctx.rank + 1)])
    tp_sum, dp_sum = value.clone(), value.clone()
    dist.all_reduce(tp_sum, group=ctx.tp_group)
    dist.all_reduce(dp_sum, group=ctx.dp_group)
    return ctx.rank, ctx.tp_rank, ctx.dp_rank, ctx.tp_size, ctx.dp_size, tp_sum.item(), dp_sum.item()


def test_tp_and_dp_groups_on_four_ranks():
    rows = run_on_ranks(_collectives, 4, 2)
    # Megatron puts consecutive ranks in one TP group: {0,1}, {2,3}; DP groups are {0,2}, {1,3}.
    assert [r[1:5] for r in rows] == [(0, 0, 2, 2), (1, 0, 2, 2), (0, 1, 2, 2), (1, 1, 2, 2)]
    assert [r[5] for r in rows] == [3.0, 3.0, 7.0, 7.0]
    assert [r[6] for r in rows] == [4.0, 6.0, 4.0, 6.0]


def _column_row_pair():
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["parallel.tp=2"]))
    mp_cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                 perform_initialization=True, params_dtype=torch.float32)
    torch.manual_seed(0)
    fc1 = ColumnParallelLinear(8, 12, config=mp_cfg, init_method=torch.nn.init.normal_, bias=True, gather_output=False)
    fc2 = RowParallelLinear(12, 6, config=mp_cfg, init_method=torch.nn.init.normal_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    torch.manual_seed(1)
    x = torch.randn(5, 8, requires_grad=True)
    hidden, _ = fc1(x)
    out, _ = fc2(torch.nn.functional.gelu(hidden))
    out.pow(2).sum().backward()
    return {
        "tp_rank": ctx.tp_rank, "out": out.detach(), "x_grad": x.grad,
        "w1": fc1.weight.detach(), "b1": fc1.bias.detach(), "w2": fc2.weight.detach(), "b2": fc2.bias.detach(),
        "gw1": fc1.weight.grad, "gb1": fc1.bias.grad, "gw2": fc2.weight.grad, "gb2": fc2.bias.grad,
    }


def test_column_row_pair_at_tp2_equals_dense():
    shards = run_on_ranks(_column_row_pair, 2)
    w1 = torch.cat([s["w1"] for s in shards], 0).requires_grad_()
    b1 = torch.cat([s["b1"] for s in shards], 0).requires_grad_()
    w2 = torch.cat([s["w2"] for s in shards], 1).requires_grad_()
    b2 = shards[0]["b2"].clone().requires_grad_()
    torch.manual_seed(1)
    x = torch.randn(5, 8, requires_grad=True)
    out = torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + b2
    out.pow(2).sum().backward()
    n = 8 + 12 + 5  # the two matmuls' inner dimensions, then the backward's sum over the 5 rows
    for s in shards:
        assert_close_across(s["out"], out.detach(), dtype=torch.float32, reduction_size=n)
        assert_close_across(s["x_grad"], x.grad, dtype=torch.float32, reduction_size=n)
        assert_close_across(s["gb2"], b2.grad, dtype=torch.float32, reduction_size=n)
    assert_close_across(torch.cat([s["gw1"] for s in shards], 0), w1.grad, dtype=torch.float32, reduction_size=n)
    assert_close_across(torch.cat([s["gb1"] for s in shards], 0), b1.grad, dtype=torch.float32, reduction_size=n)
    assert_close_across(torch.cat([s["gw2"] for s in shards], 1), w2.grad, dtype=torch.float32, reduction_size=n)
