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
                                                  ("block_causal", f"bc-edlm-{energy}-block")) if family in rep.curves}
    if out:
        out["best"] = tuple(f for families in out.values() for f in families)
    return out


def summarise(rep: Replicates, energies) -> dict:
    """Everything the targets ask: speed-ups at MDLM's best Gen PPL (vs the paper's MDLM and vs every MDLM
    variant), per energy and EDLM family, and EDLM-AR's sequential calls at the AR sampler's quality."""
    out = {"settings": len(rep.names)}
    for ref_name, reference in (("paper_mdlm", PAPER_MDLM), ("every_mdlm", EVERY_MDLM)):
        present = tuple(f for f in reference if f in rep.curves)
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
    lines = ["| setting | Gen PPL [95 % CI] | ms/sample | sequential calls/sample | model tokens/sample |",
             "|---|---|---|---|---|"]
    for s, name in enumerate(rep.names):
        lines.append(f"| {name} | {_fmt(interval(rep.ppl[:, s]))} | {1e3 * float(rep.cost['seconds'][0, s]):.2f} | "
                     f"{float(rep.cost['calls'][0, s]):.1f} | {float(rep.cost['tokens'][0, s]):.0f} |")
    return lines


def headline_table(summary: dict, energies) -> list[str]:
    lines = []
    for ref_name, title in (("paper_mdlm", "the paper's MDLM (whole row, ancestral or cached)"),
                            ("every_mdlm", "every MDLM variant (incl. block-wise and block-causal)")):
        entry = summary[ref_name]
        lines += ["", f"Reference: {title}; its best Gen PPL {_fmt(entry['best_gen_ppl'])}.", "",
                  "| energy | EDLM family | speed-up, wall clock | speed-up, sequential calls | speed-up, model tokens | "
                  "fastest EDLM curve (wall) |", "|---|---|---|---|---|---|"]
        for energy in energies:
            for name, values in entry["speedups"].get(energy, {}).items():
                lines.append(f"| {energy} | {name} | {_fmt(values['seconds'])} | {_fmt(values['calls'])} | "
                             f"{_fmt(values['tokens'])} | {values['seconds']['candidate_curve'] or '-'} |")
        if entry.get("block_mdlm"):
            b = entry["block_mdlm"]
            lines.append(f"| (none) | block-wise MDLM | {_fmt(b['seconds'])} | {_fmt(b['calls'])} | {_fmt(b['tokens'])} | "
                         f"{b['seconds']['candidate_curve'] or '-'} |")
    if "at_ar_quality" in summary:
        entry = summary["at_ar_quality"]
        lines += ["", f"AR sampler: Gen PPL {_fmt(entry['ar_gen_ppl'])} in {entry['ar_calls']:.0f} sequential calls; "
                  f"target (within 10 %): {_fmt(entry['target_gen_ppl'])}.", "",
                  "| EDLM | sequential calls at the target | AR calls ÷ EDLM calls | curve |", "|---|---|---|---|"]
        for name, values in entry["edlm"].items():
            calls = "not reached" if math.isinf(values["calls"]) else f"{values['calls']:.1f}"
            lines.append(f"| {name} | {calls} | {_fmt(values['ar_calls_over_edlm_calls'])} | {values['curve'] or '-'} |")
    return lines


def plot(rep: Replicates, path: Path, title: str) -> None:
    """Gen PPL vs each cost (log-log): one line per curve, MDLM families in black/grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {}
    for ax, measure in zip(axes, MEASURES):
        for family, curves in rep.curves.items():
            for curve, index in curves.items():
                if curve not in styles:
                    mdlm = family.startswith("mdlm") or family in ("ar", "bc-mdlm")
                    styles[curve] = ({"color": "k" if family == "mdlm" else "grey", "ls": "-" if family != "ar" else ":",
                                      "marker": "o", "lw": 2} if mdlm else
                                     {"color": colours[len(styles) % len(colours)], "marker": ".", "lw": 1})
                x = rep.cost[measure][0, index].tolist()
                y = rep.ppl[0, index].tolist()
                ax.plot(x, y, ms=4, label=curve, **styles[curve])
        ax.set(xscale="log", yscale="log", xlabel={"seconds": "seconds per sample (wall)",
                                                   "calls": "sequential model calls per sample",
                                                   "tokens": "model tokens per sample"}[measure])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("exact Gen PPL")
    axes[-1].legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
