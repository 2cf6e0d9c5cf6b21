"""Probes of issue 21's GPU items, one per subprocess (each gets a fresh CUDA context); run by gpu_check.sh.

``python tools/gpu_check.py PROBE WORKDIR`` prints ``PASS|FAIL|SKIP item: detail`` lines and numbers.
Every probe that checks a crash class also runs its negative control (the crash a CPU tensor or a CPU
generator gives on this machine), so a PASS means the bug class exists here and our code avoids it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

TINY = {"data.seq_len": 64, "model.hidden_size": 128, "model.n_blocks": 2, "model.n_heads": 4, "model.cond_dim": 32,
        "model.dropout": 0.1, "train.global_batch": 32, "train.micro_batch": 8, "train.warmup_steps": 2,
        "train.log_every": 1, "train.val_every": 2, "train.val_batches": 2, "train.save_every": 2,
        "logging.progress": False, "train.precision": "bf16"}


def say(status: str, item: str, detail: str) -> None:
    print(f"{status} {item}: {detail}", flush=True)


def _single_rank_env(local_rank: int = 0) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("GPU_CHECK_PORT", "29517"))


def _overrides(data: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, "data.dir": str(data), **extra}.items()]


def probe_data(work: Path) -> None:
    from edlm_dist.config.schema import SyntheticConfig
    from edlm_dist.data.prepare import prepare_data

    prepare_data("synthetic", work / "data", seq_len=64, synthetic_cfg=SyntheticConfig(train_rows=2048, valid_rows=256),
                 seed=1, progress=False)
    say("PASS", "data", f"synthetic data in {work / 'data'}")


def probe_controls(work: Path) -> None:
    """Negative controls: on this machine a CPU generator / CPU tensor does crash the CUDA path."""
    import torch.distributed as dist

    _single_rank_env()
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    try:
        torch.rand(4, device="cuda", generator=torch.Generator())
        say("FAIL", "control 1", "a CPU generator drew CUDA noise: the item-1 check cannot fail here")
    except RuntimeError as exc:
        say("PASS", "control 1", f"a CPU generator with CUDA noise raises ({str(exc).splitlines()[0][:70]})")
    try:
        dist.all_reduce(torch.ones(1))
        say("FAIL", "control 2", "NCCL reduced a CPU tensor: the item-2 check cannot fail here")
    except (RuntimeError, ValueError) as exc:
        say("PASS", "control 2", f"a CPU tensor in an NCCL all_reduce raises ({str(exc).splitlines()[0][:70]})")
    dist.destroy_process_group()


def _train(cfg_overrides: list[str], out: Path, stop_after=None) -> dict:
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.trainer import Trainer

    cfg = load_config(None, cfg_overrides)
    trainer = Trainer(cfg, out, init_parallel(cfg))
    try:
        torch.cuda.reset_peak_memory_stats()
        metrics = trainer.train(stop_after=stop_after)
        return {"metrics": metrics, "peak_bytes": torch.cuda.max_memory_allocated(), "trainer": trainer}
    finally:
        trainer.close()


def probe_train(work: Path) -> None:
    """Items 1, 2, 7, 9: MDLM (save, validate, resume) and NCE steps in bf16 under NCCL, 1 GPU."""
    from deepspeed.accelerator import get_accelerator

    from edlm_dist.models.build import estimate_memory
    from edlm_dist.training.metrics_logger import read_metrics

    _single_rank_env()
    data, out = work / "data", work / "mdlm"
    first = _train(_overrides(data, **{"train.steps": 4}), out, stop_after=2)  # steps 1-2, checkpoint, validation
    say("PASS", "items 1,2", f"MDLM bf16 steps 1-2 with validation and checkpoint on {torch.cuda.get_device_name()}"
        f" (accelerator {get_accelerator().device_name()}); loss {first['metrics'].get('loss'):.4f}")
    resumed = _train(_overrides(data, **{"train.steps": 4}), out)  # resumes from step 2: map_location, generators
    trainer = resumed["trainer"]
    say("PASS", "item 9", f"resumed from step 2 to {trainer.step}; EMA shadow on "
        f"{sorted({str(s.device) for s in trainer.ema.shadow})}")
    say("INFO", "item 7", f"engine ZeRO stage {trainer.engine.zero_optimization_stage()}, data types "
        f"{trainer.engine.get_data_types()}; module params {sorted({str(p.dtype) for p in trainer.engine.module.parameters()})}"
        f", EMA shadow {sorted({str(s.dtype) for s in trainer.ema.shadow})}")
    cfg = trainer.cfg
    estimate = estimate_memory(cfg.model, trainer.vocab_size, cfg.data.seq_len, cfg.train.micro_batch,
                               cfg.train.zero_stage, 1, 1, "bf16", kind="dit")
    rows = [r for r in read_metrics(out) if "tokens_per_s" in r]
    say("INFO", "numbers", f"tokens/s {rows[-1]['tokens_per_s']:.0f}, MFU {rows[-1].get('mfu', float('nan')):.4f}, "
        f"peak allocated {resumed['peak_bytes'] / 2**20:.1f} MiB vs estimate {estimate['total'] / 2**20:.1f} MiB")
    nce = _train(_overrides(data, **{"train.objective": "nce", "train.steps": 2, "train.diffusion_ckpt": str(out),
                                     "train.n_negatives": 2}), work / "nce")
    say("PASS", "item 1 (NCE)", f"NCE bf16 2 steps, loss {nce['metrics'].get('loss'):.4f}")


def probe_local_rank(work: Path) -> None:
    """Item 8: one GPU bound to the task (CUDA_VISIBLE_DEVICES) and LOCAL_RANK=3, as SLURM gives it."""
    _single_rank_env(local_rank=3)
    from edlm_dist.parallel.deepspeed_engine import build_engine
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.runtime import init_parallel

    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=8", "train.precision=bf16"])
    ctx = init_parallel(cfg)
    engine, _, _ = build_engine(torch.nn.Linear(4, 4), cfg, ctx.dp_size, device=ctx.device)
    devices = sorted({str(p.device) for p in engine.module.parameters()})
    say("PASS", "item 8", f"LOCAL_RANK=3 with {torch.cuda.device_count()} visible GPU: rank device {ctx.device}, "
        f"engine params on {devices}")


def probe_fork(work: Path) -> None:
    """Items 3, 4: the test setup's availability check leaves CUDA uninitialised, so forked ranks can use it."""
    import tests.conftest  # noqa: F401 - the suite's own setup, as pytest runs it

    available, initialised = torch.cuda.is_available(), torch.cuda.is_initialized()
    pid = os.fork()
    if pid == 0:
        try:
            torch.ones(1, device="cuda").sum().item()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    from deepspeed.accelerator import get_accelerator

    ok = available and not initialised and status == 0 and get_accelerator().device_name() == "cuda"
    say("PASS" if ok else "FAIL", "items 3,4", f"cuda available={available}, initialised in the parent={initialised}, "
        f"forked child used CUDA: {status == 0}, DeepSpeed accelerator {get_accelerator().device_name()}")


def probe_apex(work: Path) -> None:
    """Item 10: which LayerNorm and Adam a run gets here."""
    from edlm_dist.config.schema import TrainConfig
    from edlm_dist.models.layers import LayerNorm
    from edlm_dist.parallel.deepspeed_engine import build_optimizer

    norm = LayerNorm(8, use_apex=True)
    opt = build_optimizer([torch.nn.Parameter(torch.ones(2, device="cuda"))], TrainConfig(), True, torch.device("cuda"))
    say("INFO", "item 10", f"LayerNorm: {'apex' if norm._apex is not None else 'torch'}; optimizer: {type(opt).__name__}")


def probe_inference(work: Path) -> None:
    """Item 12 (figures only): bf16 autocast vs fp32 throughput of one DiT forward at paper-like shape."""
    from edlm_dist.config.schema import ModelConfig
    from edlm_dist.models.build import build_model

    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model("dit", ModelConfig(hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128, dropout=0.0),
                        50257, 1024, device=torch.device("cuda")).eval()
    tokens = torch.randint(0, 50257, (8, 1024), device="cuda")
    for label, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                       ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
        with torch.no_grad(), ctx:
            model(tokens, None)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                model(tokens, None)
            torch.cuda.synchronize()
        say("INFO", "item 12", f"DiT-small forward B=8 L=1024 {label}: {(time.perf_counter() - start) / 5 * 1e3:.1f} ms")


PROBES = {name[len("probe_"):]: fn for name, fn in globals().items() if name.startswith("probe_")}

if __name__ == "__main__":
    PROBES[sys.argv[1]](Path(sys.argv[2]))
