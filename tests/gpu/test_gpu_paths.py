"""GPU-only paths: NCCL tensor parallelism, DeepSpeed ZeRO in bf16, and the demo pipeline on one GPU.

Marked ``gpu``: skipped without CUDA (tests/conftest.py), run on GPU machines. Ranks are started
with ``spawn`` (CUDA cannot be used in forked children). bf16 tolerances are stated per test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from edlm_dist.config.load import load_config
from tests.spawn import run_on_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multirank]

TINY = ["model.hidden_size=64", "model.n_blocks=2", "model.n_heads=4", "model.cond_dim=16", "model.dropout=0.0",
        "parallel.backend=nccl"]
V, L, B = 37, 16, 4


def _need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, this machine has {torch.cuda.device_count()}")


def _logits_and_grads(kind: str, tp: int):
    from edlm_dist.models.build import build_model
    from edlm_dist.parallel.sharded_state import full_grads
    from edlm_dist.parallel.runtime import init_parallel
    from tests.models.model_helpers import randomise_weights

    cfg = load_config(None, TINY + [f"parallel.tp={tp}"])
    ctx = init_parallel(cfg, training=False)
    torch.manual_seed(0)
    model = build_model(kind, cfg.model, V, L, device=ctx.device)
    randomise_weights(model, seed=3)  # zero-initialised output layers would give zero logits and gradients
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, V, (B, L), generator=g).to(ctx.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens, tokens) if kind == "energy" else model(tokens, gather_logits=True) if kind == "ar" \
            else model(tokens, None, gather_logits=True)
    out.float().pow(2).mean().backward()
    grads = {k: v.float().cpu() for k, v in full_grads(model).items()}
    assert grads.keys() == {name for name, _ in model.named_parameters()}, "a parameter got no gradient"
    return out.float().cpu(), grads


@pytest.mark.parametrize("kind", ["dit", "ar", "energy"])
def test_tp2_equals_tp1_with_nccl_and_bf16(kind):
    _need_gpus(2)
    out1, grads1 = run_on_ranks(_logits_and_grads, 1, kind, 1, start_method="spawn")[0]
    assert out1.abs().max() > 0
    silent = [name for name, grad in grads1.items() if not grad.abs().max() > 0]
    assert not silent, f"parameters with an all-zero gradient: {silent}"  # the check below must compare something
    for out2, grads2 in run_on_ranks(_logits_and_grads, 2, kind, 2, start_method="spawn"):
        # bf16 matmuls with a different reduction split: agree to bf16 precision (8 bits of mantissa).
        torch.testing.assert_close(out2, out1, rtol=2e-2, atol=2e-2)
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], rtol=5e-2, atol=5e-3, msg=name)


def _zero_losses(data_dir, stage: int, world: int):
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.trainer import Trainer

    cfg = load_config(None, TINY + [f"data.dir={data_dir}", "data.seq_len=32", f"train.zero_stage={stage}",
                                    "train.precision=bf16", "train.steps=10", "train.log_every=1",
                                    "train.global_batch=16", f"train.micro_batch={16 // world}",
                                    "train.val_every=1000", "train.save_every=1000", "logging.progress=false",
                                    "train.objective=ar"])
    from pathlib import Path

    out = Path(data_dir).parent / f"zero{stage}_w{world}"
    trainer = Trainer(cfg, out, init_parallel(cfg))
    trainer.train()
    trainer.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    from edlm_dist.config.schema import SyntheticConfig
    from edlm_dist.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("gpu") / "data"
    prepare_data("synthetic", out, seq_len=32, synthetic_cfg=SyntheticConfig(train_rows=2000, valid_rows=256),
                 seed=1, progress=False)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_bf16_on_gpus_tracks_one_gpu(gpu_data, stage):
    _need_gpus(2)
    # The AR objective draws no noise, so 1 GPU and 2 GPUs see the same global batches and losses.
    reference = run_on_ranks(_zero_losses, 1, gpu_data, 0, 1, start_method="spawn")[0]
    losses = run_on_ranks(_zero_losses, 2, gpu_data, stage, 2, start_method="spawn")[0]
    assert reference[-1] < reference[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-2, atol=2e-2)


def _pipeline(out_dir):
    from edlm_dist.pipeline.run import run_pipeline

    cfg = load_config("configs/demo.yaml", [
        "train.precision=bf16", "pipeline.mdlm_steps=200", "pipeline.ar_steps=200", "pipeline.nce_steps=50",
        "pipeline.num_samples=32", "pipeline.step_counts=[4,8]", "logging.progress=false"])
    return run_pipeline(cfg, out_dir)


@pytest.mark.timeout(1900)  # above the rank's own 1800 s limit, so that one reports what was running
def test_demo_pipeline_on_one_gpu_in_bf16(tmp_path):
    _need_gpus(1)
    results = run_on_ranks(_pipeline, 1, tmp_path, start_method="spawn", timeout=1800)[0]
    assert (tmp_path / "frontier.png").stat().st_size > 0
    for method, rows in results["methods"].items():
        assert all(math.isfinite(row["gen_ppl"]) and row["gen_ppl"] > 1 for row in rows), method
    # bf16 training still learns: the AR validation NLL is within 0.5 nats of the language's entropy rate.
    assert results["likelihood"]["methods"]["ar"]["nll"] < results["data"]["nll_per_token"] + 0.5


def test_block_causal_denoiser_on_one_gpu():
    """Block-causal DiT on CUDA: fp32 two-stream == one-stream logits, cached == uncached block logits (SDPA's
    masked CUDA kernel vs the cache's split softmax), and a bf16 training step of the block objective."""
    _need_gpus(1)
    from edlm_dist.config.schema import RunConfig
    from edlm_dist.models.build import build_model
    from edlm_dist.training.objective_steps import MDLMObjective

    cfg = load_config(None, TINY[:-1] + ["model.block_size=4", f"data.seq_len={L}"])
    torch.manual_seed(0)
    model = build_model("dit", cfg.model, V, L, device="cuda").eval()
    for p in model.parameters():  # zero-initialised output/adaLN layers would make every logit 0
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    x0, x_t = (torch.randint(0, V - 1, (B, L), generator=g).cuda() for _ in range(2))
    with torch.no_grad():
        training = model(x_t, x0=x0, gather_logits=True)
        cache = model.new_cache()
        for j in range(L // 4):
            own = slice(4 * j, 4 * j + 4)
            row = torch.cat([x0[:, :own.start], x_t[:, own.start:]], dim=1)
            scale = training[:, own].abs().max()
            torch.testing.assert_close(model(row, gather_logits=True)[:, own], training[:, own], atol=1e-4 * scale,
                                       rtol=0)
            cached = model(x_t[:, own], cache=cache, append=False, gather_logits=True)
            torch.testing.assert_close(cached, training[:, own], atol=1e-4 * scale, rtol=0)
            model(x0[:, own], cache=cache)
    model.train()
    objective = MDLMObjective(RunConfig(), V, V - 1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = objective.loss(model, x0, torch.Generator(device="cpu").manual_seed(2))
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_block_lookahead_on_one_gpu():
    """block_lookahead on CUDA (its lookahead on a side stream beside the AR energy's call): the same tokens as
    without it (fp32 models, float64 races), every first call served with T = 1."""
    _need_gpus(1)
    from edlm_dist.models.build import build_model
    from edlm_dist.sampling.block_denoiser import BlockCausalDenoiser
    from edlm_dist.sampling.blocks import sample_blocks
    from edlm_dist.sampling.model_energies import AREnergy
    from edlm_dist.sampling.settings import SamplerSettings

    cfg = load_config(None, TINY[:-1] + ["model.block_size=4", f"data.seq_len={L}"])
    torch.manual_seed(0)
    models = [build_model(kind, cfg.model, V, L, device="cuda").eval() for kind in ("dit", "ar")]
    for model in models:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    energy = AREnergy(models[1], V - 1, carry_over=True)
    outs = []
    for lookahead in (False, True):
        settings = SamplerSettings(sampler="edlm", steps=1, k=8, window=1.0, block_size=2, seed=3,
                                   block_lookahead=lookahead)
        outs.append(sample_blocks(BlockCausalDenoiser(models[0], V - 1, V), settings, range(B), length=L,
                                  mask_id=V - 1, device="cuda", energy_fn=energy))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[1].lookahead_hits == L // 2 - 1 and outs[1].nfe == outs[0].nfe - outs[1].lookahead_hits
