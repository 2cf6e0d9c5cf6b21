"""Tables, plots and the machine-readable summary of a frontier run (tools/frontier)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tools.frontier.analysis import MEASURES, Replicates, best_ppl, interval, speedup

PAPER_MDLM = ("mdlm", "mdlm-ancestral")  # the paper's MDLM: whole-row ancestral sampling, cached or not
EVERY_MDLM = ("mdlm", "mdlm-ancestral", "mdlm-block", "bc-mdlm")


def edlm_families(rep: Replicates, energy: str) -> dict[str, tuple]:
    """The EDLM families of one energy present in the run: whole row, block-wise, block-causal, and all."""
    out = {name: (family,) for name, family in (("whole_row", f"edlm-{energy}"), ("block", f"edlm-{energy}-block"),
                                                  ("block_ar_first", f"edlm-{energy}-block-arfirst"),
                                                  ("block_causal", f"bc-edlm-{energy}-block"),
                                                  ("block_causal_ar_first", f"bc-edlm-{energy}-block-arfirst"),
                                                  ("block_causal_lookahead", f"bc-edlm-{energy}-block-lookahead"),
                                                  ("block_causal_ar_first_lookahead",
                                                   f"bc-edlm-{energy}-block-arfirst-lookahead"))
           if family in rep.curves}
    if out:
        out["best"] = tuple(f for families in out.values() for f in families)
    return out


def summarise(rep: Replicates, energies) -> dict:
    """Everything the targets ask: speed-ups at MDLM's best Gen PPL (vs the paper's MDLM and vs every MDLM
    variant), per energy and EDLM family, and EDLM-AR's sequential calls at the AR sampler's quality."""
    out = {"settings": len(rep.names)}
    for ref_name, reference in (("paper_mdlm", PAPER_MDLM), ("every_mdlm", EVERY_MDLM)):
        present = tuple(f for f in reference if f in rep.curves)
        if not present:  # e.g. one of several sweeps merged later (--from-json): no MDLM rows in this one
            continue
        target = best_ppl(rep, present)
        entry = {"families": list(present), "best_gen_ppl": interval(target), "speedups": {}}
        for energy in energies:
            entry["speedups"][energy] = {name: speedup(rep, present, families, target)
                                         for name, families in edlm_families(rep, energy).items()}
        if ref_name == "paper_mdlm":
            entry["block_mdlm"] = speedup(rep, present, ("mdlm-block",), target) if "mdlm-block" in rep.curves else None
        out[ref_name] = entry
    if "ar" in rep.curves:
        ar_index = next(iter(rep.curves["ar"].values()))[0]
        target = 1.1 * rep.ppl[:, ar_index]
        entry = {"ar_gen_ppl": interval(rep.ppl[:, ar_index]), "ar_calls": float(rep.cost["calls"][0, ar_index]),
                 "target_gen_ppl": interval(target), "edlm": {}}
        for energy in energies:
            for name, families in edlm_families(rep, energy).items():
                calls, curve = rep.family_cost(families, target, "calls")
                ratio = torch.where(torch.isfinite(calls), rep.cost["calls"][:, ar_index] / calls,
                                    torch.zeros_like(calls))
                entry["edlm"][f"{energy}/{name}"] = {"calls": float(calls[0]), "curve": curve,
                                                     "ar_calls_over_edlm_calls": interval(ratio)}
        out["at_ar_quality"] = entry
    return out


def _fmt(entry: dict, digits: int = 2) -> str:
    if entry["estimate"] == 0 and entry["reached"] == 0:
        return "not reached"
    text = f"{entry['estimate']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"
    return text if entry["reached"] >= 0.999 else f"{text} (reached in {100 * entry['reached']:.0f} %)"


def settings_table(rep: Replicates) -> list[str]:
    lines = ["| setting | Gen PPL [95 % CI] | ms/sample (wall) | CPU ms/sample | sequential calls/sample | "
             "model tokens/sample |", "|---|---|---|---|---|---|"]
    for s, name in enumerate(rep.names):
        lines.append(f"| {name} | {_fmt(interval(rep.ppl[:, s]))} | {1e3 * float(rep.cost['seconds'][0, s]):.2f} | "
                     f"{1e3 * float(rep.cost['cpu_seconds'][0, s]):.2f} | "
                     f"{float(rep.cost['calls'][0, s]):.1f} | {float(rep.cost['tokens'][0, s]):.0f} |")
    return lines


def headline_table(summary: dict, energies) -> list[str]:
    lines = []
    for ref_name, title in (("paper_mdlm", "the paper's MDLM (whole row, ancestral or cached)"),
                            ("every_mdlm", "every MDLM variant (incl. block-wise and block-causal)")):
        entry = summary.get(ref_name)
        if entry is None:
            continue
        lines += ["", f"Reference: {title}; its best Gen PPL {_fmt(entry['best_gen_ppl'])}.", "",
                  "| energy | EDLM family | speed-up, wall clock | speed-up, CPU time | speed-up, sequential calls | "
                  "speed-up, model tokens | fastest EDLM curve (CPU) |", "|---|---|---|---|---|---|---|"]
        for energy in energies:
            for name, values in entry["speedups"].get(energy, {}).items():
                lines.append(f"| {energy} | {name} | {_fmt(values['seconds'])} | {_fmt(values['cpu_seconds'])} | "
                             f"{_fmt(values['calls'])} | {_fmt(values['tokens'])} | "
                             f"{values['cpu_seconds']['candidate_curve'] or '-'} |")
        if entry.get("block_mdlm"):
            b = entry["block_mdlm"]
            lines.append(f"| (none) | block-wise MDLM | {_fmt(b['seconds'])} | {_fmt(b['cpu_seconds'])} | {_fmt(b['calls'])} | "
                         f"{_fmt(b['tokens'])} | {b['cpu_seconds']['candidate_curve'] or '-'} |")
    if "at_ar_quality" in summary:
        entry = summary["at_ar_quality"]
        lines += ["", f"AR sampler: Gen PPL {_fmt(entry['ar_gen_ppl'])} in {entry['ar_calls']:.0f} sequential calls; "
                  f"target (within 10 %): {_fmt(entry['target_gen_ppl'])}.", "",
                  "| EDLM | sequential calls at the target | AR calls ÷ EDLM calls | curve |", "|---|---|---|---|"]
        for name, values in entry["edlm"].items():
            calls = "not reached" if math.isinf(values["calls"]) else f"{values['calls']:.1f}"
            lines.append(f"| {name} | {calls} | {_fmt(values['ar_calls_over_edlm_calls'])} | {values['curve'] or '-'} |")
    return lines


def plot(rep: Replicates, path: Path, title: str, energies) -> None:
    """Gen PPL (pooled point estimates) against CPU time (``path``), sequential calls (``*_calls.png``) and wall
    clock (``*_wall.png``), log-log, one panel per energy: its EDLM curves (whole row dashed, block-wise solid) over the references
    (MDLM cached black, block-wise MDLM grey, block-causal MDLM brown, the AR sampler a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = {"mdlm": {"color": "k", "lw": 2.2}, "mdlm-block": {"color": "0.55", "lw": 1.4},
                  "bc-mdlm": {"color": "saddlebrown", "lw": 1.4}}
    labels = {"cpu_seconds": "CPU seconds per sample (one thread)", "seconds": "seconds per sample (wall)",
              "calls": "sequential model calls per sample"}
    for measure, suffix in (("cpu_seconds", ""), ("calls", "_calls"), ("seconds", "_wall")):
        target = path.with_name(path.stem + suffix + path.suffix)
        cols = 2
        rows = -(-len(energies) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), sharex=True, sharey=True, squeeze=False)
        for ax in axes.flat[len(energies):]:
            ax.set_visible(False)
        for ax, energy in zip(axes.flat, energies):
            for family, style in references.items():
                for n, (curve, index) in enumerate(rep.curves.get(family, {}).items()):
                    ax.plot(rep.cost[measure][0, index].tolist(), rep.ppl[0, index].tolist(), marker="o", ms=3,
                            label=curve if n < 3 else None, **style)
            for index in rep.curves.get("ar", {}).values():
                ax.plot(rep.cost[measure][0, index].tolist(), rep.ppl[0, index].tolist(), "*", ms=12, color="crimson",
                        label="AR sampler")
            for family, ls in ((f"edlm-{energy}", "--"), (f"edlm-{energy}-block", "-"), (f"edlm-{energy}-block-arfirst", ":"),
                               (f"bc-edlm-{energy}-block", "-."), (f"bc-edlm-{energy}-block-arfirst", ":"),
                               (f"bc-edlm-{energy}-block-lookahead", "-."),
                               (f"bc-edlm-{energy}-block-arfirst-lookahead", ":")):
                for curve, index in rep.curves.get(family, {}).items():
                    ax.plot(rep.cost[measure][0, index].tolist(), rep.ppl[0, index].tolist(), ls=ls, marker=".", ms=5,
                            lw=1.2, label=curve)
            ax.set(xscale="log", yscale="log", title=f"EDLM-{energy}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        for ax in axes[-1]:
            ax.set_xlabel(labels[measure])
        for ax in axes[:, 0]:
            ax.set_ylabel("exact Gen PPL (3 seeds pooled)")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
        plt.close(fig)
