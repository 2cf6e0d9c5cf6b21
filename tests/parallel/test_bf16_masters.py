"""bf16 training keeps MDLM's bf16-mixed numerics (issue 21, item 7): fp32 gradient accumulation and
reduction in DeepSpeed, and an EMA that follows the fp32 master weights, not their bf16 copies.

Two gloo ranks run DeepSpeed in bf16 on the CPU. The learning rate is chosen so that one update moves
every master weight by less than half a bf16 step: the bf16 copies the model computes with do not move,
the fp32 masters do. An EMA fed the bf16 copies would stay frozen; fed the masters it follows them
exactly (checked against the closed form of one EMA step)."""

from __future__ import annotations

import pytest
import torch

from edlm_dist.config.load import load_config
from tests.spawn import run_on_ranks

pytestmark = pytest.mark.multirank

OVERRIDES = ["train.precision=bf16", "train.zero_stage=0", "train.global_batch=8", "train.micro_batch=2",
             "train.lr=1e-6", "train.warmup_steps=0", "train.weight_decay=0.0", "train.grad_clip=0.0", "train.steps=3"]


def cpu(tensors) -> list[torch.Tensor]:
    return [t.detach().cpu().clone() for t in tensors]


def _bf16_step():
    from edlm_dist.parallel.deepspeed_engine import build_engine, deepspeed_config, fp32_master_params
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.ema import EMA

    cfg = load_config(None, OVERRIDES)
    ctx = init_parallel(cfg)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    engine, _, _ = build_engine(model, cfg, ctx.dp_size, device=ctx.device)
    masters0 = [m.clone() for m in fp32_master_params(engine)]
    ema = EMA(list(engine.module.parameters()), 0.5, values=fp32_master_params(engine))
    bf16_before = [p.detach().clone() for p in engine.module.parameters()]
    g = torch.Generator(device="cpu").manual_seed(ctx.dp_rank)
    for _ in range(engine.gradient_accumulation_steps()):
        x, y = torch.randn(2, 6, generator=g), torch.randn(2, 1, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x.to(ctx.device, torch.bfloat16)).float(), y.to(ctx.device))
        engine.backward(loss)
        engine.step()
    masters1 = fp32_master_params(engine)
    ema.update(fp32_master_params(engine))
    return {
        "config": deepspeed_config(cfg, ctx.dp_size), "stage": engine.zero_optimization_stage(),
        "param_dtypes": {str(p.dtype) for p in engine.module.parameters()},
        "masters0": cpu(masters0), "masters1": cpu(masters1), "bf16_before": cpu(bf16_before),
        "bf16_after": cpu(engine.module.parameters()), "shadow": cpu(ema.shadow),
    }


def test_bf16_accumulates_in_fp32_and_the_ema_follows_the_masters():
    rows = run_on_ranks(_bf16_step, 2)
    for row in rows:
        assert row["config"]["data_types"] == {"grad_accum_dtype": "fp32"}
        assert row["config"]["communication_data_type"] == "fp32"
        assert row["stage"] == 1  # bf16 at zero_stage=0 runs as ZeRO-1: fp32 accumulation needs it
        assert row["param_dtypes"] == {"torch.bfloat16"}
        moved = [not torch.equal(a, b) for a, b in zip(row["masters0"], row["masters1"])]
        assert all(moved), "every master weight must take the (tiny) update"
        assert all(torch.equal(a, b) for a, b in zip(row["bf16_before"], row["bf16_after"])), \
            "the update is below a bf16 step: the bf16 copies stay put (else the test proves nothing)"
        for shadow, m0, m1 in zip(row["shadow"], row["masters0"], row["masters1"]):
            decay = min(0.5, 2 / 11)  # EMA's first update: min(decay, (1 + n) / (10 + n)) with n = 1
            torch.testing.assert_close(shadow, decay * m0 + (1 - decay) * m1, rtol=0, atol=1e-7)
            assert not torch.equal(shadow, m0)
    torch.testing.assert_close(rows[0]["masters1"], rows[1]["masters1"], rtol=0, atol=0)  # one model on both ranks
