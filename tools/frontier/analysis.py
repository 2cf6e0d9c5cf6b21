"""Speed-ups at equal exact Gen PPL, with bootstrap intervals (tools/frontier).

Every setting was run on the same sample ids for the same seeds, so the rows line up across settings. A
bootstrap replicate draws seeds with replacement and then rows within each drawn seed
(``edlm_dist.evaluation.intervals.resample_counts``), and applies the SAME draw to every setting
(paired, like the side-by-side run). Per replicate: each setting's Gen PPL (token-weighted) and its mean
costs; the cost at which a family first reaches a target Gen PPL (interpolated in log-log along T on
each curve, the cheapest curve wins); and the ratio of two families' costs. Replicate 0 is the data
itself (the point estimate); the interval is the percentile interval of the others.

Costs: ``seconds`` (wall clock per sample, measured side by side in one process), ``cpu_seconds`` (the
process's CPU time per sample: with one thread, the wall clock an idle core would give, and far less
disturbed than wall time on a machine other jobs share), ``calls`` (sequential model calls per sample) and
``tokens`` (model tokens per sample).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

MEASURES = ("seconds", "cpu_seconds", "calls", "tokens")


@dataclass
class Replicates:
    """Per replicate (row 0 = the data) and setting: Gen PPL and the mean of each cost."""

    names: list[str]
    curves: dict  # family -> {curve: [setting index in T order]}
    ppl: torch.Tensor  # (R + 1, S)
    cost: dict  # measure -> (R + 1, S)

    def family_cost(self, families, target: torch.Tensor, measure: str) -> tuple[torch.Tensor, list]:
        """(R + 1,) cheapest cost at which any curve of ``families`` reaches Gen PPL <= target (inf: never),
        and the curve that does it in replicate 0."""
        best = torch.full_like(target, math.inf)
        best_curve = [None]
        for family in families:
            for curve, index in self.curves.get(family, {}).items():
                cost = reach(self.ppl[:, index], self.cost[measure][:, index], target)
                if float(cost[0]) < float(best[0]):
                    best_curve[0] = curve
                best = torch.minimum(best, cost)
        return best, best_curve[0]


def build_replicates(results: list[dict], n_resamples: int = 1000, seed: int = 0) -> Replicates:
    """``results``: [{"method": Method.as_dict(), "seeds": [run_method dicts]}], all on the same ids and seeds."""
    from edlm_dist.evaluation.intervals import resample_counts

    first = results[0]["seeds"]
    groups = torch.cat([torch.full((len(run["nll"]),), i) for i, run in enumerate(first)])
    counts = resample_counts(groups, n_resamples, torch.Generator().manual_seed(seed))
    counts = torch.cat([torch.ones(1, groups.numel(), dtype=torch.float64), counts])
    names, curves = [], {}
    ppl = torch.empty(counts.shape[0], len(results), dtype=torch.float64)
    cost = {m: torch.empty_like(ppl) for m in MEASURES}
    for s, entry in enumerate(results):
        runs = entry["seeds"]
        if [len(r["nll"]) for r in runs] != [len(r["nll"]) for r in first]:
            raise SystemExit(f"error: {entry['method']['name']} has other sample counts than the first setting; "
                             "every setting must run on the same seeds and ids")
        nll = torch.tensor([v for r in runs for v in r["nll"]], dtype=torch.float64)
        scored = torch.tensor([float(r["scored_tokens"]) for r in runs for _ in r["nll"]], dtype=torch.float64)
        ppl[:, s] = torch.exp((counts @ nll) / (counts @ scored))
        for m in MEASURES:
            per_row = torch.tensor([float(r[m]) for r in runs for _ in r["nll"]], dtype=torch.float64)
            cost[m][:, s] = (counts @ per_row) / counts.sum(dim=1)
        method = entry["method"]
        names.append(method["name"])
        curves.setdefault(method["family"], {}).setdefault(method["curve"], []).append((method["steps"], s))
    curves = {f: {c: [s for _, s in sorted(points)] for c, points in cs.items()} for f, cs in curves.items()}
    return Replicates(names, curves, ppl, cost)


def reach(ppl: torch.Tensor, cost: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(R,) cost at which a curve (R, n points in T order) first reaches Gen PPL <= target: the first point
    if it already does, else log-log interpolation between the first bracketing pair; inf if none does."""
    out = torch.where(ppl[:, 0] <= target, cost[:, 0], torch.full_like(target, math.inf))
    done = ppl[:, 0] <= target
    for i in range(1, ppl.shape[1]):
        hit = ~done & (ppl[:, i] <= target)
        lp0, lp1, lt = ppl[:, i - 1].log(), ppl[:, i].log(), target.log()
        frac = ((lp0 - lt) / (lp0 - lp1).clamp_min(1e-300)).clamp(0, 1)
        value = torch.exp(cost[:, i - 1].log() + frac * (cost[:, i].log() - cost[:, i - 1].log()))
        out = torch.where(hit, value, out)
        done |= hit
    return out


def interval(values: torch.Tensor, level: float = 0.95) -> dict:
    """Point estimate (replicate 0), percentile interval of replicates 1.., and the share that is finite > 0."""
    from edlm_dist.evaluation.intervals import percentile_interval

    reps = values[1:].clone()
    finite = torch.isfinite(reps) & (reps > 0)
    reps = torch.where(torch.isfinite(reps), reps, torch.full_like(reps, 1e12))
    found = percentile_interval(float(values[0]), reps, level)
    return {"estimate": found.estimate, "low": found.low, "high": found.high, "level": level,
            "reached": float(finite.double().mean())}


def speedup(rep: Replicates, reference: tuple, candidate: tuple, target: torch.Tensor) -> dict:
    """cost(reference reaches target) / cost(candidate reaches target) for every measure, with intervals."""
    out = {}
    for measure in MEASURES:
        ref, ref_curve = rep.family_cost(reference, target, measure)
        got, got_curve = rep.family_cost(candidate, target, measure)
        ratio = torch.where(torch.isfinite(got), ref / got, torch.zeros_like(got))
        out[measure] = {**interval(ratio), "reference_cost": float(ref[0]), "candidate_cost": float(got[0]),
                        "reference_curve": ref_curve, "candidate_curve": got_curve}
    return out


def best_ppl(rep: Replicates, families: tuple) -> torch.Tensor:
    """(R + 1,) the lowest Gen PPL any setting of ``families`` reaches, per replicate."""
    index = [s for f in families for curve in rep.curves.get(f, {}).values() for s in curve]
    return rep.ppl[:, index].min(dim=1).values


def merge_runs(payloads: list[dict]) -> dict:
    """One run from several sweeps: of the same grid on different seeds (e.g. one process per seed, so a shared
    machine gives each its own share; the per-seed numbers are concatenated, setting by setting), or of
    different settings on the same seeds (e.g. the costly whole-row rows in a process of their own; the
    settings are joined, and stay paired by seed and sample index)."""
    first = payloads[0]
    if len(payloads) == 1:
        return first
    names = [[r["method"]["name"] for r in p["results"]] for p in payloads]
    seed_lists = [[run["seed"] for run in p["results"][0]["seeds"]] for p in payloads]
    disjoint = len({n for grid in names for n in grid}) == sum(len(grid) for grid in names)
    if disjoint and all(seeds == seed_lists[0] for seeds in seed_lists):
        if any((p["length"], p["batch_size"]) != (first["length"], first["batch_size"]) for p in payloads):
            raise SystemExit("error: --from-json runs of different settings must share the length and batch size")
        energies = list(dict.fromkeys(e for p in payloads for e in p["energies"]))
        return {**first, "energies": energies, "results": [r for p in payloads for r in p["results"]]}
    for other in payloads[1:]:
        same = all(other[key] == first[key] for key in ("length", "batch_size", "energies"))
        if not same or [r["method"]["name"] for r in other["results"]] != [r["method"]["name"] for r in first["results"]]:
            raise SystemExit("error: --from-json runs differ in length, batch size, energies or grid; merge "
                             "sweeps of the same command on different --seeds, or of different settings on the same seeds")
    results = [{"method": entry["method"], "seeds": [run for p in payloads for run in p["results"][i]["seeds"]]}
               for i, entry in enumerate(first["results"])]
    seeds = [run["seed"] for run in results[0]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --from-json runs repeat a seed ({seeds}); each run must hold other seeds")
    title = re.sub(r"seeds \[[^]]*\]", f"seeds {seeds}", first["title"])
    title = re.sub(r", sweep \d+ s$", f", {len(payloads)} sweeps side by side, one per seed set", title)
    return {**first, "title": title, "results": results}
