"""Sampler benchmark: seconds per sample vs T for MDLM and EDLM (k, w), and scaling of the
distributed proposal sampler on gloo ranks.

    OMP_NUM_THREADS=1 python3 -m tools.bench_sampler                      # trains tiny demo models first
    python3 -m tools.bench_sampler --mdlm runs/demo/mdlm --ar runs/demo/ar --steps 8 16 32 64
    OMP_NUM_THREADS=1 python3 -m tools.bench_sampler --random 128:2:128:35  # untrained, bigger: energies dominate

1. Seconds per sample (batch 1, the paper's time metric, spec §7.3) for MDLM ``ddpm_cache`` and
   EDLM-coAR with each ``--edlm k:w`` pair, at every T in ``--steps``.
2. Weak scaling: k = 2P proposals on P ranks vs k = 2 on one rank (efficiency t_1 / t_P, ideal 1).
   Strong scaling: fixed k (``--strong-k``) on 1 vs 2 ranks (speedup t_1 / t_2, ideal 2).
   Every rank holds the same x_t and runs the same denoiser call; only the proposals and their
   energies are split, so the denoiser share of a step does not shrink (docs/sampling.md).
   Control: P independent k=2 samplers run side by side (no communication). t_1 / t_control is what the
   machine alone loses when P processes share it; t_control / t_P is what the distributed sampler loses.
Prints Markdown tables (tests never time things).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edlm_dist.artifacts.weights import load_trained_model
from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig, SyntheticConfig
from edlm_dist.data.prepare import prepare_data
from edlm_dist.evaluation.intervals import bootstrap_rows, median
from edlm_dist.models.build import build_model
from edlm_dist.parallel.proposals import sampling_layout
from edlm_dist.parallel.runtime import init_parallel
from edlm_dist.sampling.engine import ModelDenoiser, SamplerSettings, sample_batch
from edlm_dist.sampling.model_energies import AREnergy
from edlm_dist.training.trainer import train
from tests.spawn import run_on_ranks

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def _train(data_dir: str, out: str, overrides: list[str]) -> bool:
    quiet = ["logging.progress=false", "train.val_every=100000", "train.save_every=100000", "train.log_every=100000"]
    train(load_config(DEMO, [f"data.dir={data_dir}", *quiet, *overrides]), out)
    return True


def tiny_models(root: Path) -> tuple[str, str]:
    """Prepare the demo's synthetic data and train a tiny MDLM and AR model (quality is irrelevant here)."""
    data = root / "data"
    prepare_data("synthetic", data, seq_len=32, synthetic_cfg=SyntheticConfig(train_rows=4000, valid_rows=64),
                 seed=1, progress=False)
    mdlm, ar = str(root / "mdlm"), str(root / "ar")
    run_on_ranks(_train, 1, str(data), mdlm, ["train.steps=100"], timeout=600)
    run_on_ranks(_train, 1, str(data), ar, ["train.objective=ar", "train.steps=60"], timeout=600)
    return mdlm, ar


def _load(source: tuple, device):
    """Denoiser + coAR energy from ``("trained", mdlm_dir, ar_dir)`` or ``("random", H, blocks, L, V)``
    (untrained weights of any size: timing does not depend on the weights)."""
    if source[0] == "trained":
        dit, meta, _ = load_trained_model(source[1], expect_kind="dit", device=device)
        ar_model = load_trained_model(source[2], expect_kind="ar", device=device)[0]
    else:
        hidden, blocks, length, vocab = source[1:]
        model_cfg = ModelConfig(hidden_size=hidden, n_blocks=blocks, n_heads=max(1, hidden // 64), cond_dim=128)
        torch.manual_seed(0)
        dit = build_model("dit", model_cfg, vocab, length, device=device).eval()
        ar_model = build_model("ar", model_cfg, vocab, length, device=device).eval()
        meta = {"mask_id": vocab - 1, "vocab_size": vocab, "seq_len": length}
    return ModelDenoiser(dit, meta["mask_id"], meta["vocab_size"]), AREnergy(ar_model, meta["mask_id"],
                                                                               carry_over=True), meta


def _seconds_per_sample(denoiser, energy, meta, settings, samples: int, batch: int, device, proposals=None) -> dict:
    def run(ids):
        return sample_batch(denoiser, settings, ids, length=meta["seq_len"], mask_id=meta["mask_id"], device=device,
                            energy_fn=energy, proposals=proposals)

    run(list(range(10_000, 10_000 + batch)))  # warm-up (allocator, first-call overheads)
    times, cpu, nfe = [], [], []
    for start in range(0, samples, batch):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick, cpu_tick = time.perf_counter(), time.process_time()
        out = run(list(range(start, start + batch)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tick) / batch)
        cpu.append((time.process_time() - cpu_tick) / batch)
        nfe.append(out.nfe)
    return {"seconds": statistics.median(times), "ms_interval": _spread([t * 1e3 for t in times], 1),
            "cpu_seconds": statistics.median(cpu), "nfe": statistics.mean(nfe)}


def _init_rank():
    """This spawned rank's parallel context (gloo on CPU; any world size, TP 1)."""
    return init_parallel(load_config(None, ["train.global_batch=8", "train.micro_batch=1"]))


def _rank_timing(source, k, proposal_parallel, steps, samples, batch) -> tuple[float, float]:
    ctx = _init_rank()
    denoiser, energy, meta = _load(source, ctx.device)
    layout = sampling_layout(ctx, proposal_parallel, k)
    settings = SamplerSettings(sampler="edlm", steps=steps, k=k, window=1.0, seed=1)
    timing = _seconds_per_sample(denoiser, energy, meta, settings, samples, batch, ctx.device, layout.proposals)
    return timing["seconds"], timing["cpu_seconds"]


def _distributed(source, ranks, k, args, proposal_parallel=None) -> tuple[float, float]:
    """(wall, CPU) seconds per sample of one run: the slowest rank. CPU time excludes waiting for peers.
    ``proposal_parallel=1`` makes every rank an independent single-rank sampler (no communication)."""
    size = ranks if proposal_parallel is None else proposal_parallel
    return max(run_on_ranks(_rank_timing, ranks, source, k, size, args.dist_steps, args.dist_samples,
                            args.dist_batch, timeout=600))


def _allgather_ms(length: int, k: int, calls: int = 2000) -> tuple[float, float]:
    """(wall, CPU) ms of one proposal all-gather (one IS step's buffer at batch 1) on the current group."""
    import torch.distributed as dist

    ctx = _init_rank()
    buffer = torch.zeros(2 + k * (length + 1), dtype=torch.float64)
    parts = [torch.empty_like(buffer) for _ in range(ctx.world_size)]
    for _ in range(100):
        dist.all_gather(parts, buffer)
    tick, cpu_tick = time.perf_counter(), time.process_time()
    for _ in range(calls):
        dist.all_gather(parts, buffer)
    return (time.perf_counter() - tick) / calls * 1e3, (time.process_time() - cpu_tick) / calls * 1e3


def _spread(values: list[float], digits: int = 2) -> str:
    """Median over the repeats and its 95 % percentile-bootstrap interval (edlm_dist.evaluation.intervals)."""
    return bootstrap_rows(values, median).format(f"{{:.{digits}f}}")


def _scaling(source, seq_len: int, args) -> None:
    """Every repeat measures every row back to back, so each ratio compares runs taken close in time;
    the table gives the median of the ratios over the repeats and its 95 % bootstrap interval."""
    rows = [("weak", 1, 2, None)]
    for p in args.ranks:
        rows += [("control", p, 2, 1), ("weak", p, 2 * p, None)]
    rows += [("strong", 1, args.strong_k, None)] + [("strong", p, args.strong_k, None) for p in args.ranks]
    times = {row: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            kind, p, k, size = row
            times[row].append(_distributed(source, p, k, args, proposal_parallel=size))

    def ratios(num, den, which):
        return [a[which] / b[which] for a, b in zip(times[num], times[den])]

    print(f"\n## Distributed proposal sampler (gloo, T={args.dist_steps}, w=1, batch {args.dist_batch}; seconds per "
          f"sample: median over samples, slowest rank; median [95 % bootstrap interval] over {args.repeats} repeats)\n")
    print("| row | ranks | k | wall s/sample | CPU s/sample/rank | wall figure | CPU figure |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        kind, p, k, size = row
        wall = _spread([t[0] for t in times[row]], 4)
        cpu = _spread([t[1] for t in times[row]], 4)
        base = ("weak" if kind == "control" else kind, 1, 2 if kind != "strong" else args.strong_k, None)
        if p == 1:
            figures = ("baseline", "baseline")
        elif kind == "control":
            figures = tuple(f"t1/tcontrol = {_spread(ratios(base, row, i))}" for i in (0, 1))
        else:
            name = "efficiency t1/tP" if kind == "weak" else "speed-up t1/tP"
            figures = tuple(f"{name} = {_spread(ratios(base, row, i))}" for i in (0, 1))
        label = f"control: {p} independent k=2 samplers" if kind == "control" else kind
        print(f"| {label} | {p} | {k} | {wall} | {cpu} | {figures[0]} | {figures[1]} |")
    for p in args.ranks:
        control = ("control", p, 2, 1)
        for i, what in ((0, "wall"), (1, "CPU")):
            print(f"\nWeak scaling net of the machine ({what}, tcontrol/tP, P={p}): "
                  f"{_spread(ratios(control, ('weak', p, 2 * p, None), i))}", end="")
        wall, cpu = run_on_ranks(_allgather_ms, p, seq_len, 2, timeout=600)[0]
        print(f"\nOne IS-step all-gather on {p} gloo ranks (k=2 per rank, L={seq_len}): {wall:.3f} ms wall, "
              f"{cpu:.3f} ms CPU per call; {args.dist_steps} steps per sample.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdlm", help="--out folder of an MDLM `edlm train` run (default: train a tiny one)")
    parser.add_argument("--ar", help="--out folder of an AR `edlm train` run (default: train a tiny one)")
    parser.add_argument("--random", metavar="H:BLOCKS:L:V", help="time untrained models of this size instead "
                        "(e.g. 768:12:1024:50258 for the paper's small models)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--edlm", nargs="+", default=["2:0.2", "4:0.2", "4:1.0"], help="k:w pairs")
    parser.add_argument("--samples", type=int, default=6, help="timed samples per setting (batch 1)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="P values for the scaling runs")
    parser.add_argument("--strong-k", type=int, default=8)
    parser.add_argument("--dist-steps", type=int, default=16)
    parser.add_argument("--dist-samples", type=int, default=8)
    parser.add_argument("--dist-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="scaling repeats (every row once each)")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1) if not torch.cuda.is_available() else None

    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as tmp:
        if args.random:
            source = ("random", *(int(v) for v in args.random.split(":")))
        else:
            source = ("trained", *((args.mdlm, args.ar) if args.mdlm and args.ar else tiny_models(Path(tmp))))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        denoiser, energy, meta = _load(source, device)
        print(f"## Seconds per sample (batch 1, L={meta['seq_len']}, V={meta['vocab_size']}, {device.type}, "
              f"{source[0]} models, EDLM energy coAR; median of {args.samples} samples [95 % bootstrap interval])\n")
        names = ["MDLM"] + [f"EDLM k={pair.split(':')[0]} w={pair.split(':')[1]}" for pair in args.edlm]
        print("| T | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for steps in args.steps:
            cells = []
            for name, pair in zip(names, [None] + args.edlm):
                if pair is None:
                    settings = SamplerSettings(sampler="mdlm", steps=steps)
                else:
                    k, w = pair.split(":")
                    settings = SamplerSettings(sampler="edlm", steps=steps, k=int(k), window=float(w))
                r = _seconds_per_sample(denoiser, energy, meta, settings, args.samples, 1, device)
                cells.append(f"{r['ms_interval']} ms (NFE {r['nfe']:.1f})")
            print(f"| {steps} | " + " | ".join(cells) + " |")
        if args.skip_scaling:
            return
        _scaling(source, meta["seq_len"], args)


if __name__ == "__main__":
    main()
