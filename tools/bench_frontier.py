"""Quality/speed frontier of EDLM vs MDLM on trained models, and the speed-up at equal quality.

    OMP_NUM_THREADS=1 python3 -m tools.bench_frontier --runs runs/demo --json runs/frontier.json  # docs/frontier.md
    python3 -m tools.bench_frontier --runs runs/demo --from-json runs/frontier.json    # tables + plot again
    python3 -m tools.bench_frontier --runs runs/demo --profile ar:8:1.0:16              # cProfile one EDLM setting
    PYTHONPATH=OLD_TREE:. python3 -P -m tools.bench_frontier --runs runs/demo --profile ar:8:1.0:16  # older code

Run from the repository root. ``-P`` keeps the current folder off the front of ``sys.path``, so
``edlm_dist`` comes from ``OLD_TREE`` and the tool from here; every header names which one ran.

``--runs`` is the ``--out`` folder of ``edlm pipeline`` (``mdlm/``, ``ar/``, ``nce/`` inside; the data must be
the synthetic language, so Gen PPL is exact: exp of the oracle's NLL per scored token, token-weighted).

For every seed, in one process and with one batch size: MDLM at every ``--mdlm-steps`` T, then every EDLM
setting (energy x (k, w) x T). Per setting: exact Gen PPL of ``--samples`` samples and seconds per sample
(wall and process CPU). Two speed-ups at equal quality, each per seed against the same seed's MDLM, then
mean ± std over seeds:

1. per EDLM setting with Gen PPL g: t_MDLM(g) / t_EDLM, t_MDLM(g) = time of the fastest MDLM setting
   reaching g, interpolated linearly in (log seconds, log Gen PPL) between the first pair of MDLM step
   counts that brackets g. If g is below every MDLM point the setting is *beyond MDLM's reach*: the
   speed-up is unbounded, and the figure shown (marked >=) uses the fastest MDLM setting attaining
   MDLM's own best Gen PPL (more MDLM steps buy nothing; the largest-T time would inflate it). If MDLM's
   fewest steps already reach g, the figure is an upper bound (<=).
2. per MDLM step count T and energy: MDLM's time ÷ the time EDLM needs to reach MDLM's Gen PPL at T,
   interpolated along EDLM's own T curve, for the (k, w) that does it fastest on the pooled curves.

Prints Markdown tables; writes the log-log plot (``--plot``) and every per-seed number (``--json``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import matplotlib
import torch

import edlm_dist
from edlm_dist.errors import EdlmError
from edlm_dist.evaluation.sample_metrics import ExactSyntheticOracle, score_samples
from edlm_dist.pipeline.run import load_pipeline_models
from edlm_dist.sampling.engine import SamplerSettings, sample_batch

REPO = Path(__file__).resolve().parents[1]


def make_settings(sampler: str, steps: int, seed: int, k: int = 2, window: float = 0.2, skip_idle: bool = True):
    extra = {}
    if sampler == "edlm" and "skip_idle_is" in SamplerSettings.__dataclass_fields__:  # older trees lack it
        extra["skip_idle_is"] = skip_idle
    return SamplerSettings(sampler=sampler, steps=steps, k=k, window=window, seed=seed, **extra)


class RowCounter:
    """Wraps a denoiser or an energy and counts the rows it is called on (the work, whatever the batching)."""

    def __init__(self, fn):
        self.fn, self.rows = fn, 0
        self.time_conditioning = getattr(fn, "time_conditioning", False)

    def __call__(self, *args):
        self.rows += args[0].shape[0]
        return self.fn(*args)


def run_setting(denoiser, energy_fn, settings, meta, samples: int, batch: int) -> dict:
    """Sample ids 0..samples-1 in batches: tokens, wall and CPU seconds per sample, model rows per sample."""
    denoiser = RowCounter(denoiser)
    energy_fn = RowCounter(energy_fn) if energy_fn is not None else None
    tokens = []
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, samples, batch):
        ids = list(range(start, min(samples, start + batch)))
        tokens.append(sample_batch(denoiser, settings, ids, length=meta["seq_len"], mask_id=meta["mask_id"],
                                   energy_fn=energy_fn).tokens)
    return {"tokens": torch.cat(tokens), "seconds": (time.perf_counter() - wall) / samples,
            "cpu_seconds": (time.process_time() - cpu) / samples, "denoiser_rows": denoiser.rows / samples,
            "energy_rows": (energy_fn.rows if energy_fn is not None else 0) / samples}


def gen_ppl(language, tokens) -> float:
    """Exact Gen PPL: exp(-sum log p_true(row) / (rows * scored tokens)) (token-weighted, spec §7.1), scored by
    the evaluation API like `edlm eval` and the pipeline score sample files."""
    return score_samples(tokens, ExactSyntheticOracle(language), entropy=False).summary()["gen_ppl"]


def time_at(curve: list[tuple[int, float, float]], target: float) -> tuple[float, str]:
    """Seconds a sampler needs to reach Gen PPL ``target`` on ``curve`` = [(T, seconds, gen_ppl)] in T order.

    Returns (seconds, status): "interpolated" (log-log between the first bracketing pair of step counts),
    "at-fastest" (the fewest steps already reach it: an upper bound on the time), or "beyond" (no step
    count reaches it; the time is then the fastest point attaining the curve's lowest Gen PPL).
    """
    if curve[0][2] <= target:
        return curve[0][1], "at-fastest"
    for (_, t0, p0), (_, t1, p1) in zip(curve, curve[1:]):
        if p1 <= target:
            frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), "interpolated"
    best = min(p for _, _, p in curve)
    return next(t for _, t, p in curve if p == best), "beyond"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"}


def sweep(args, denoiser, energies, language, meta) -> dict:
    """Every setting for every seed: {"mdlm": {T: [per-seed dict]}, "edlm": {(energy, k, w, T): [...]}}."""
    grid = [(e, int(k), float(w), steps) for e in args.energies for k, w in (p.split(":") for p in args.kw)
            for steps in args.edlm_steps]
    results = {"mdlm": {steps: [] for steps in args.mdlm_steps}, "edlm": {key: [] for key in grid}}
    warm = min(args.batch_size, args.samples)
    run_setting(denoiser, None, make_settings("mdlm", 8, 0), meta, warm, warm)  # first-call overheads
    for kind in args.energies:
        run_setting(denoiser, energies[kind], make_settings("edlm", 4, 0, k=2, window=1.0), meta, warm, warm)
    started = time.perf_counter()
    for seed in args.seeds:  # seed-major: every seed's points see the same machine conditions
        for steps in args.mdlm_steps:
            r = run_setting(denoiser, None, make_settings("mdlm", steps, seed), meta, args.samples, args.batch_size)
            results["mdlm"][steps].append({**_strip(r), "gen_ppl": gen_ppl(language, r["tokens"]), "seed": seed})
        for kind, k, w, steps in grid:
            settings = make_settings("edlm", steps, seed, k=k, window=w, skip_idle=not args.no_skip_idle)
            r = run_setting(denoiser, energies[kind], settings, meta, args.samples, args.batch_size)
            results["edlm"][(kind, k, w, steps)].append({**_strip(r), "gen_ppl": gen_ppl(language, r["tokens"]),
                                                        "seed": seed})
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
    return results


def _curve(rows_by_steps: dict, seed_index: Optional[int], clock: str = "seconds") -> list:
    """[(T, seconds, gen_ppl)] in T order for one seed, or pooled over seeds (None): mean time and the
    Gen PPL of all samples together (equal sample counts: exp of the mean log Gen PPL)."""
    out = []
    for steps in sorted(rows_by_steps):
        rows = rows_by_steps[steps] if seed_index is None else [rows_by_steps[steps][seed_index]]
        out.append((steps, statistics.mean(r[clock] for r in rows),
                    math.exp(statistics.mean(math.log(r["gen_ppl"]) for r in rows))))
    return out


def setting_speedups(results: dict, clock: str = "seconds") -> dict:
    """{(energy, k, w, T): [(t_MDLM(g) / t_EDLM, status) per seed]} against the same seed's MDLM curve."""
    out = {}
    for key, rows in results["edlm"].items():
        out[key] = []
        for i, row in enumerate(rows):
            seconds, status = time_at(_curve(results["mdlm"], i, clock), row["gen_ppl"])
            out[key].append((seconds / row[clock], status))
    return out


def pareto_steps(curve: list) -> list[int]:
    """MDLM step counts whose Gen PPL beats every fewer-step count (the quality levels MDLM can buy)."""
    out, best = [], math.inf
    for steps, _, ppl in curve:
        if ppl < best:
            out.append(steps)
            best = ppl
    return out


def quality_level_speedups(results: dict, clock: str = "seconds") -> dict:
    """For each energy and each MDLM Pareto step count T (pooled curve), with g = MDLM's Gen PPL at T: the
    (k, w) whose EDLM curve (interpolated along its own T) reaches g fastest on the pooled curves, and its
    per-seed speed-ups t_MDLM(g) / t_EDLM(g) with statuses (both times from the same seed's curves, MDLM's
    the fastest setting reaching g). ``{energy: {T: dict | None}}``."""
    by_setting: dict = {}
    for (kind, k, w, steps), rows in results["edlm"].items():
        by_setting.setdefault(kind, {}).setdefault((k, w), {})[steps] = rows
    seeds = len(next(iter(results["mdlm"].values())))
    mdlm_pooled = _curve(results["mdlm"], None, clock)
    levels = {steps: ppl for steps, _, ppl in mdlm_pooled if steps in pareto_steps(mdlm_pooled)}
    out = {}
    for kind, curves in by_setting.items():
        out[kind] = {}
        for steps, target in levels.items():
            reach = {kw: time_at(_curve(c, None, clock), target) for kw, c in curves.items()}
            reach = {kw: v for kw, v in reach.items() if v[1] != "beyond"}
            if not reach:
                out[kind][steps] = None  # no (k, w) of this energy reaches MDLM's quality at this T
                continue
            kw = min(reach, key=lambda key: reach[key][0])
            per_seed = []
            for i in range(seeds):
                seed_target = results["mdlm"][steps][i]["gen_ppl"]
                mdlm_seconds = time_at(_curve(results["mdlm"], i, clock), seed_target)[0]
                edlm_seconds, status = time_at(_curve(curves[kw], i, clock), seed_target)
                per_seed.append((mdlm_seconds / edlm_seconds, status))
            mdlm_seconds = time_at(mdlm_pooled, target)[0]
            out[kind][steps] = {"k": kw[0], "window": kw[1], "target_gen_ppl": target, "mdlm_seconds": mdlm_seconds,
                                "edlm_seconds": reach[kw][0], "pooled_speedup": mdlm_seconds / reach[kw][0],
                                "pooled_status": reach[kw][1], "per_seed": per_seed}
    return out


MARKS = {"beyond": "≥", "at-fastest": "≤"}  # speed-up bounds (setting table)
EDLM_MARKS = {"beyond": "≤", "at-fastest": "≥"}  # the same seen from EDLM's curve (quality-level table)


def _marked(pairs: list[tuple[float, str]], marks: dict, word: str = "beyond") -> str:
    found = {marks[s] for _, s in pairs if s in marks}
    mark = "?" if len(found) > 1 else (found.pop() if found else "")
    beyond = sum(s == "beyond" for _, s in pairs)
    note = f" ({beyond}/{len(pairs)} {word})" if beyond else ""
    return f"{mark}{_fmt([v for v, _ in pairs])}{note}"


def print_tables(results: dict, data_ppl: float) -> dict:
    """Markdown tables; returns the quality-level speed-ups (wall and CPU)."""
    best_mdlm = min(p for _, _, p in _curve(results["mdlm"], None))
    print(f"\n### MDLM (data Gen PPL {data_ppl:.2f}; MDLM's best pooled Gen PPL {best_mdlm:.2f})\n")
    print("| T | Gen PPL | ms/sample (wall) | ms/sample (CPU) | denoiser rows/sample |")
    print("|---|---|---|---|---|")
    for steps, rows in sorted(results["mdlm"].items()):
        print(f"| {steps} | {_fmt([r['gen_ppl'] for r in rows])} | {_fmt([1e3 * r['seconds'] for r in rows])} | "
              f"{_fmt([1e3 * r['cpu_seconds'] for r in rows])} | "
              f"{statistics.mean(r['denoiser_rows'] for r in rows):.1f} |")
    wall = setting_speedups(results)
    print("\n### EDLM settings (speed-up = MDLM's interpolated time at the same Gen PPL ÷ EDLM's; ≥ and "
          "'beyond': Gen PPL below every MDLM T, ratio to the fastest MDLM T attaining MDLM's best)\n")
    print("| energy | k | w | T | Gen PPL | ms/sample (wall) | denoiser rows/sample | energy rows/sample | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, rows in results["edlm"].items():
        kind, k, w, steps = key
        print(f"| {kind} | {k} | {w:g} | {steps} | {_fmt([r['gen_ppl'] for r in rows])} | "
              f"{_fmt([1e3 * r['seconds'] for r in rows])} | "
              f"{statistics.mean(r['denoiser_rows'] for r in rows):.0f} | "
              f"{statistics.mean(r['energy_rows'] for r in rows):.0f} | {_marked(wall[key], MARKS)} |")
    levels = {"wall": quality_level_speedups(results), "cpu": quality_level_speedups(results, "cpu_seconds")}
    kinds = list(levels["wall"])
    print("\n### Speed-up at MDLM's quality levels (best (k, w) per energy, EDLM interpolated along T; "
          "mean ± std over seeds, wall clock; ≤: this EDLM curve misses the level in some seed)\n")
    print("| MDLM T | Gen PPL | MDLM ms | " + " | ".join(f"EDLM-{kind}" for kind in kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    pooled = {steps: (seconds, ppl) for steps, seconds, ppl in _curve(results["mdlm"], None)}
    for steps in levels["wall"][kinds[0]]:
        cells = []
        for kind in kinds:
            entry = levels["wall"][kind][steps]
            cells.append("not reached" if entry is None else
                         f"{_marked(entry['per_seed'], EDLM_MARKS, 'missed')} (k={entry['k']}, w={entry['window']:g}: "
                         f"{1e3 * entry['edlm_seconds']:.1f} ms)")
        print(f"| {steps} | {pooled[steps][1]:.2f} | {1e3 * pooled[steps][0]:.2f} | " + " | ".join(cells) + " |")
    gaps = [abs(a[0] - b[0]) for kind in kinds for steps, entry in levels["wall"][kind].items() if entry
            for a, b in zip(entry["per_seed"], levels["cpu"][kind][steps]["per_seed"])]
    print(f"\nThe same speed-ups from process CPU time instead of wall clock differ by at most {max(gaps):.3f}.")
    return levels


def plot(results: dict, data_ppl: float, path: Path) -> None:
    """Gen PPL vs seconds per sample (log-log, pooled over seeds): one panel per energy, MDLM in each."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the headless backend

    kinds = sorted({key[0] for key in results["edlm"]}, key=["ar", "coar", "nce", "oracle"].index)
    cols = min(2, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), sharex=True, sharey=True, squeeze=False)
    mdlm = _curve(results["mdlm"], None)
    mdlm_label = f"MDLM, T = {min(results['mdlm'])}..{max(results['mdlm'])}"
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    for ax, kind in zip(axes.flat, kinds):
        ax.plot([t for _, t, _ in mdlm], [p for _, _, p in mdlm], "k-o", lw=2, ms=3, label=mdlm_label)
        for k, w in sorted({(k, w) for (e, k, w, _) in results["edlm"] if e == kind}):
            rows = {s: r for (e, kk, ww, s), r in results["edlm"].items() if (e, kk, ww) == (kind, k, w)}
            points = _curve(rows, None)
            ax.plot([t for _, t, _ in points], [p for _, _, p in points], "-o", ms=3,
                    label=f"k={k}, w={w:g}, T={min(rows)}..{max(rows)}")
        ax.axhline(min(p for _, _, p in mdlm), color="k", ls="--", lw=0.8, label="MDLM's best")
        ax.axhline(data_ppl, color="grey", ls=":", lw=1, label="data")
        ax.set(xscale="log", yscale="log", title=f"EDLM-{kind} vs MDLM")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("seconds per sample (same batch size for all)")
    for ax in axes[:, 0]:
        ax.set_ylabel("exact Gen PPL (pooled over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}", file=sys.stderr)


def profile(args, denoiser, energies, meta) -> None:
    """cProfile one setting ``energy:k:w:T`` (energy ``mdlm``: plain MDLM) after a warm-up batch; prints
    seconds per sample (median of ``--repeats`` timed runs) and the top costs of one more run."""
    kind, k, w, steps = args.profile.split(":")
    settings = make_settings("mdlm" if kind == "mdlm" else "edlm", int(steps), args.seeds[0], k=int(k),
                             window=float(w), skip_idle=not args.no_skip_idle)
    energy_fn = energies.get(kind)
    batch = min(args.batch_size, args.samples)
    run_setting(denoiser, energy_fn, settings, meta, batch, batch)
    runs = [run_setting(denoiser, energy_fn, settings, meta, args.samples, args.batch_size)
            for _ in range(args.repeats)]
    timed = {clock: statistics.median(r[clock] for r in runs) for clock in ("seconds", "cpu_seconds")}
    profiler = cProfile.Profile()
    profiler.enable()
    run_setting(denoiser, energy_fn, settings, meta, args.samples, args.batch_size)
    profiler.disable()
    print(f"{args.profile}: {1e3 * timed['seconds']:.2f} ms/sample wall, {1e3 * timed['cpu_seconds']:.2f} ms CPU "
          f"(batch {args.batch_size}, {args.samples} samples, {settings}, edlm_dist from "
          f"{Path(edlm_dist.__file__).parent})")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile_top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="--out folder of `edlm pipeline configs/demo.yaml`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=128, help="samples per setting and seed")
    parser.add_argument("--batch-size", type=int, default=32, help="one batch size for every method")
    parser.add_argument("--mdlm-steps", type=int, nargs="+",
                        default=[4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024])
    parser.add_argument("--edlm-steps", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--energies", nargs="+", default=["ar", "coar", "nce", "oracle"],
                        choices=["ar", "coar", "nce", "oracle"])
    parser.add_argument("--kw", nargs="+", default=["2:0.2", "2:1.0", "4:0.5", "8:1.0"], help="k:window pairs")
    parser.add_argument("--no-skip-idle", action="store_true", help="run IS at every window step (skip_idle_is off)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "frontier.png")
    parser.add_argument("--json", type=Path, help="write every per-seed number here")
    parser.add_argument("--profile", metavar="ENERGY:K:W:T", help="profile one setting instead of the sweep "
                        "(ENERGY mdlm: MDLM at T, k and w ignored)")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the profiled setting (median)")
    parser.add_argument("--from-json", type=Path, help="tables and plot from a saved --json instead of sampling")
    args = parser.parse_args()
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        results = {"mdlm": {int(steps): rows for steps, rows in payload["mdlm"].items()},
                   "edlm": {(e["energy"], e["k"], e["window"], e["steps"]): e["seeds"] for e in payload["edlm"]}}
        print(payload["title"])
        print_tables(results, payload["data_gen_ppl"])
        plot(results, payload["data_gen_ppl"], args.plot)
        return
    torch.set_num_threads(1)
    try:
        denoiser, energies, language, meta = load_pipeline_models(args.runs)
    except EdlmError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.profile:
        profile(args, denoiser, energies, meta)
        return
    data_ppl = math.exp(language.entropy_per_token()[0])
    started = time.perf_counter()
    results = sweep(args, denoiser, energies, language, meta)
    title = (f"# Frontier: {args.runs}, seeds {args.seeds}, {args.samples} samples per setting and seed, batch "
             f"{args.batch_size}, skip_idle_is={not args.no_skip_idle}, torch {torch.__version__}, edlm_dist from "
             f"{Path(edlm_dist.__file__).parent}, "
             f"{time.strftime('%Y-%m-%d')}, sweep {time.perf_counter() - started:.0f} s")
    print(title)
    levels = print_tables(results, data_ppl)
    plot(results, data_ppl, args.plot)
    if args.json:
        payload = {"title": title, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "data_gen_ppl": data_ppl, "mdlm": results["mdlm"],
                   "edlm": [{"energy": e, "k": k, "window": w, "steps": s, "seeds": rows}
                            for (e, k, w, s), rows in results["edlm"].items()],
                   "quality_levels": levels}
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
