"""Training-step benchmark: tokens/s, achieved FLOP/s vs this machine's measured matmul peak, and
DeepSpeed ZeRO-1/2/3 step time relative to plain PyTorch DDP on 2 ranks.

    OMP_NUM_THREADS=1 python -m tools.bench_train                 # CPU defaults
    python -m tools.bench_train --hidden 768 --blocks 12 --heads 12 --seq-len 1024 --batch 8 --vocab 50258   # GPU

On CUDA the achieved FLOP/s is also reported as MFU against the GPU's datasheet bf16 peak
(``--peak-tflops``; default: the card's entry in edlm_dist/training/peak_flops.py, named in the
output). Prints figures; tests never time things.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edlm_dist.config.load import load_config
from edlm_dist.evaluation.intervals import Interval, bootstrap_rows, bootstrap_samples, median
from edlm_dist.models.build import build_model, flops_per_token
from edlm_dist.objectives.losses import mdlm_loss
from edlm_dist.objectives.schedule import LogLinearSchedule, mask_tokens, sample_times
from edlm_dist.parallel.deepspeed_engine import build_engine
from edlm_dist.parallel.devices import device_generator
from edlm_dist.parallel.runtime import init_parallel
from edlm_dist.training.peak_flops import peak_for_device_name
from tests.spawn import run_on_ranks


VOCAB = 35  # the CPU default; a GPU run passes --vocab 50258 (GPT-2) so the output layer costs what it will


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of a square GEMM on this machine, same threads/dtype as the training step."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _config(args, extra=()):
    return load_config(None, [f"model.hidden_size={args.hidden}", f"model.n_blocks={args.blocks}",
                              f"model.n_heads={args.heads}", f"model.cond_dim={args.cond}",
                              f"data.seq_len={args.seq_len}", f"train.micro_batch={args.batch}",
                              f"train.global_batch={args.batch * args.world}", "train.precision=fp32", *extra])


def _step_fn(model, batch, schedule, generator, autocast, mask_id: int):
    t = sample_times(batch.shape[0], generator=generator, device=batch.device)
    x_t = mask_tokens(batch, schedule.move_chance(t), mask_id, generator=generator)
    with autocast:
        logits = model(x_t, schedule.total_noise(t))
    loss, _ = mdlm_loss(logits.float(), batch, x_t, t, mask_id, schedule=schedule)
    return loss


def single_process(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _config(args)
    torch.manual_seed(0)
    model = build_model("dit", cfg.model, args.vocab, args.seq_len, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = LogLinearSchedule()
    generator = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, args.vocab - 1, (args.batch, args.seq_len), device=device)
    bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = _step_fn(model, batch, schedule, generator, autocast, args.vocab - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens = args.batch * args.seq_len
    flops = flops_per_token(cfg.model, args.vocab, args.seq_len, "dit") * tokens / step
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = measured_matmul_peak(device, dtype, args.matmul_size, 10)
    out = {"device": str(device), "threads": torch.get_num_threads(), "step_s": step, "tokens_per_s": tokens / step,
           "achieved_gflops": flops / 1e9, "matmul_peak_gflops": peak / 1e9, "fraction_of_matmul_peak": flops / peak}
    if device.type == "cuda":
        known = peak_for_device_name(torch.cuda.get_device_name(device))
        peak_tflops = args.peak_tflops or (known.tflops if known else None)
        if peak_tflops:
            out["mfu_vs_datasheet"] = flops / (peak_tflops * 1e12)
            out["datasheet_peak"] = f"{peak_tflops:g} TFLOP/s ({'--peak-tflops' if args.peak_tflops else known.label})"
    return out


def _ranked_step_time(args, mode: str) -> list[float]:
    """Step times on this rank: ``ddp`` (plain torch) or ``zero{1,2,3}`` (DeepSpeed)."""
    import torch.distributed as dist

    stage = int(mode[-1]) if mode.startswith("zero") else 0
    cfg = _config(args, [f"train.zero_stage={stage}", "train.grad_clip=0"])
    ctx = init_parallel(cfg)
    torch.manual_seed(0)
    model = build_model("dit", cfg.model, args.vocab, args.seq_len, device=ctx.device)
    if mode == "ddp":
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        engine = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        engine, optimizer, _ = build_engine(model, cfg, ctx.dp_size, device=ctx.device)
    schedule = LogLinearSchedule()
    generator = device_generator(ctx.device, ctx.rank)  # draws noise on the rank's device
    batch = torch.randint(0, args.vocab - 1, (args.batch, args.seq_len)).to(ctx.device)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        loss = _step_fn(engine, batch, schedule, generator, torch.autocast(ctx.device.type, enabled=False),
                        args.vocab - 1)
        if mode == "ddp":
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            engine.backward(loss)
            engine.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def zero_vs_ddp(args) -> dict:
    steps = {}  # per mode: each step's time on the slowest rank
    for mode in ("ddp", "zero1", "zero2", "zero3"):
        per_rank = run_on_ranks(_ranked_step_time, args.world, args, mode, timeout=900)
        steps[mode] = [max(times) for times in zip(*per_rank)]
    def ratio(times):  # DDP against itself is 1 by definition, not a resampled ratio
        if times is steps["ddp"]:
            return Interval(1.0, 1.0, 1.0)
        return bootstrap_samples([times, steps["ddp"]], lambda a, b: median(a) / median(b))

    return {mode: {"step_s": bootstrap_rows(times, median), "ratio_vs_ddp": ratio(times)} for mode, times in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--cond", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-zero", action="store_true")
    args = parser.parse_args()
    one = single_process(args)
    print(f"model: DiT hidden={args.hidden} blocks={args.blocks} heads={args.heads} seq_len={args.seq_len} "
          f"batch={args.batch} vocab={args.vocab}")
    for key, value in one.items():
        print(f"  {key:>26}: {value:.4g}" if isinstance(value, float) else f"  {key:>26}: {value}")
    if not args.skip_zero and not torch.cuda.is_available():
        print(f"step time on {args.world} ranks (gloo, slowest rank; median of {args.steps} steps "
              "[95 % bootstrap interval]):")
        for mode, row in zero_vs_ddp(args).items():
            ms = row["step_s"]
            print(f"  {mode:>6}: {ms.estimate * 1e3:.1f} ms [{ms.low * 1e3:.1f}, {ms.high * 1e3:.1f}]   "
                  f"x{row['ratio_vs_ddp'].format('{:.3f}')} of plain torch DDP")


if __name__ == "__main__":
    main()
