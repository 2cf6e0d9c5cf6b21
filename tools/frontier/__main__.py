"""Quality/cost frontier of every sampler on the trained demo models, and EDLM's speed-ups at equal Gen PPL.

    OMP_NUM_THREADS=1 python -m tools.frontier --runs runs/demo --batch-size 32 \
        --json runs/frontier/L32_b32.json
    python -m tools.frontier --from-json runs/frontier/L32_b32.json --plot docs/frontier_L32_b32.png \
        --summary docs/frontier_summary.json

Every setting of the grid (tools/frontier/methods.py; ``--only REGEX`` keeps a subset) samples ids
0..samples-1 for every seed, in one process, seed-major, after a warm-up of each family, so the wall
clock ratios compare settings measured side by side. Gen PPL is exact (the synthetic language). Costs per
sample: wall seconds, sequential model calls, model tokens. Intervals: paired two-level bootstrap over
seeds and samples (tools/frontier/analysis.py). Prints Markdown tables; ``--summary`` merges this run's
headline numbers into a JSON file under the key L<length>_batch<batch>.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path


def _sweep(args) -> dict:
    import torch

    from tools.frontier.methods import default_grid, load_models, run_method

    torch.set_num_threads(1)
    models = load_models(args.runs, tuple(args.block_causal))
    grid = [m for m in default_grid(models.length, args.energies, sorted(models.block_causal))
            if re.search(args.only, m.name)]
    if not grid:
        raise SystemExit(f"error: --only {args.only!r} keeps no setting of the grid")
    warmed = set()
    for method in grid:  # first-call overheads (allocations, lazy imports) out of the timed runs; two rows do it
        if method.curve not in warmed:
            run_method(models, method, 0, min(2, args.samples), args.batch_size)
            warmed.add(method.curve)
    results = {m.name: {"method": m.as_dict(), "seeds": []} for m in grid}
    started = time.perf_counter()

    def payload(seeds: list[int]) -> dict:
        return {"title": (f"L = {models.length}, batch {args.batch_size}, seeds {seeds}, {args.samples} samples per "
                          f"setting and seed, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, sweep "
                          f"{time.perf_counter() - started:.0f} s"),
                "length": models.length, "batch_size": args.batch_size, "energies": args.energies,
                "data_gen_ppl": float(torch.exp(torch.tensor(models.language.entropy_per_token()[0]))),
                "results": list(results.values())}

    for n, seed in enumerate(args.seeds):
        for method in grid:
            results[method.name]["seeds"].append(run_method(models, method, seed, args.samples, args.batch_size))
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if args.json:  # every finished seed is kept, so a sweep stopped early still reports what it measured
            _write_json(args.json, payload(args.seeds[: n + 1]))
    return payload(args.seeds)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload))
    partial.replace(path)


def _profile(args) -> None:
    """cProfile the grid setting named ``args.profile`` (after a warm-up): seconds per sample, the share of
    each model's forwards, the sampler's own top costs."""
    import cProfile
    import pstats

    import torch

    from tools.frontier.methods import default_grid, load_models, run_method

    torch.set_num_threads(1)
    models = load_models(args.runs, tuple(args.block_causal))
    grid = {m.name: m for m in default_grid(models.length, args.energies, sorted(models.block_causal))}
    if args.profile not in grid:
        raise SystemExit(f"error: --profile {args.profile!r} is not a grid setting; e.g. {sorted(grid)[:3]}")
    method = grid[args.profile]
    run_method(models, method, 0, args.batch_size, args.batch_size)
    profiler = cProfile.Profile()
    profiler.enable()
    run = run_method(models, method, args.seeds[0], args.samples, args.batch_size)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[3] for key, entry in stats.stats.items() if key[2] == "run_method")
    print(f"{method.name}: {1e3 * run['seconds']:.2f} ms/sample (profiled), {run['calls']:.1f} sequential calls, "
          f"{run['tokens']:.0f} model tokens per sample, batch {args.batch_size}")
    from edlm_dist.data.synthetic import SyntheticLanguage
    from edlm_dist.models.ar import ARTransformer
    from edlm_dist.models.dit import DiT
    from edlm_dist.models.energy import EnergyModel

    shares = {"denoiser (DiT forward)": DiT.forward, "AR model forward": ARTransformer.forward,
              "NCE energy network": EnergyModel.forward, "exact language (oracle)": SyntheticLanguage._score}
    for label, function in shares.items():
        code = function.__code__
        cum = sum(entry[3] for key, entry in stats.stats.items()
                  if key[0] == code.co_filename and key[1] == code.co_firstlineno)
        print(f"  {label}: {100 * cum / max(total, 1e-9):.0f} % of the time")
    stats.sort_stats("tottime").print_stats(args.profile_top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="--out folder of `edlm pipeline` (mdlm/, ar/, nce/ inside)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=64, help="samples per setting and seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--energies", nargs="+", default=["ar", "coar", "nce", "oracle"])
    parser.add_argument("--only", default="", help="keep the grid settings whose name matches this regex")
    parser.add_argument("--block-causal", type=Path, nargs="*", default=[],
                        help="`edlm train` runs of block-causal DiTs (model.block_size < L) on the same data")
    parser.add_argument("--json", type=Path, help="write every per-seed number here")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="tables, plot and summary from saved --json runs (several: one per seed, merged)")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--summary", type=Path, help="merge the headline numbers into this JSON file")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--profile", metavar="SETTING", help="cProfile one grid setting by name instead of the sweep")
    parser.add_argument("--profile-top", type=int, default=12)
    args = parser.parse_args()
    if args.profile:
        _profile(args)
        return
    if args.from_json:
        from tools.frontier.analysis import merge_runs

        payload = merge_runs([json.loads(path.read_text()) for path in args.from_json])
    elif args.runs:
        payload = _sweep(args)
    else:
        raise SystemExit("error: pass --runs <pipeline folder> to sample, or --from-json <saved run> to report")

    from tools.frontier.analysis import build_replicates
    from tools.frontier.report import headline_table, plot, settings_table, summarise

    rep = build_replicates(payload["results"], args.resamples)
    summary = summarise(rep, payload["energies"])
    print(f"## {payload['title']}\n\nData Gen PPL {payload['data_gen_ppl']:.3f}.\n")
    print("\n".join(settings_table(rep)))
    print("\n".join(headline_table(summary, payload["energies"])))
    if args.plot:
        plot(rep, args.plot, payload["title"], payload["energies"])
        print(f"\nwrote {args.plot}", file=sys.stderr)
    if args.summary:
        merged = json.loads(args.summary.read_text()) if args.summary.is_file() else {}
        merged[f"L{payload['length']}_batch{payload['batch_size']}"] = {"title": payload["title"], **summary}
        args.summary.write_text(json.dumps(_finite_or_null(merged), indent=1, allow_nan=False) + "\n")


def _finite_or_null(value):
    """Strict JSON for other tools: a cost never reached (inf) or undefined (nan) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value


if __name__ == "__main__":
    main()
