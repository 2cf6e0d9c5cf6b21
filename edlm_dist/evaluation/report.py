"""Result reports: markdown tables, the paper's quality/speed plots (Fig. 1a, Fig. 4), and ``edlm eval``'s
``metrics.json`` / ``metrics.md``.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so
they work headless and from several threads.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from edlm_dist.errors import DataError
from edlm_dist.storage.files import write_atomic, write_json_atomic, write_with
from edlm_dist.evaluation.likelihood import safe_exp

METRICS_FILE, METRICS_REPORT, PIPELINE_REPORT = "metrics.json", "metrics.md", "results.md"


def _cell(value, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return float_format.format(value)
    return str(value).replace("|", "\\|")  # a literal pipe would split the cell


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], float_format: str = "{:.3f}") -> str:
    """A GitHub markdown table with one row per dict; missing keys and None render as "-"."""
    if not columns:
        raise DataError("markdown_table needs at least one column name")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(col), float_format) for col in columns) + " |")
    return "\n".join(lines) + "\n"


def _points(results: Mapping[str, Sequence[Mapping]], x_key: str, y_key: str):
    """Per method: (x, y) pairs sorted by x, skipping points where x or y is missing (None)."""
    out = {}
    for method, points in results.items():
        pairs = []
        for i, point in enumerate(points):
            if y_key not in point and x_key not in point:
                raise DataError(f"result {i} of method {method!r} has neither {x_key!r} nor {y_key!r}")
            x, y = point.get(x_key), point.get(y_key)
            if x is not None and y is not None:
                pairs.append((float(x), float(y)))
        out[method] = sorted(pairs)
    return out


def _new_figure(ncols: int):
    fig = Figure(figsize=(5.0 * ncols, 4.0), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _draw(ax, series, xlabel: str, ylabel: str, log_x: bool, log_y: bool = False) -> None:
    for method, pairs in series.items():
        if pairs:
            xs, ys = zip(*pairs)
            ax.plot(xs, ys, marker="o", label=method)
    if log_x:
        ax.set_xscale("log")
    if log_y:  # plain numbers; minor ticks labelled too when the values span less than a decade
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ys = [y for pairs in series.values() for _, y in pairs if y > 0]
        if ys and max(ys) < 10 * min(ys):
            ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png"))
    return path


def plot_frontier(results: Mapping[str, Sequence[Mapping]], path) -> str:
    """Paper Fig. 1a: Gen PPL vs sampling steps and vs seconds/sample, one line per method, log-x.

    results: method name -> list of dicts with keys steps, gen_ppl, seconds_per_sample, entropy
    (a missing/None value drops that point from the panel that needs it). Returns the PNG path.
    """
    fig, (by_steps, by_time) = _new_figure(2)
    by_step_points = _points(results, "steps", "gen_ppl")
    _draw(by_steps, by_step_points, "sampling steps T", "Gen PPL (log)", log_x=True, log_y=True)
    label_steps(by_steps, sorted({x for pairs in by_step_points.values() for x, _ in pairs}))
    timed = _points(results, "seconds_per_sample", "gen_ppl")
    # A method without timings (e.g. an AR number copied from the paper) becomes a dashed
    # reference line, like the AR line of the paper's figure.
    for method, pairs in timed.items():
        if not pairs:
            for point in results[method]:
                if point.get("gen_ppl") is not None:
                    by_time.axhline(
                        float(point["gen_ppl"]), linestyle="--", color="gray", label=f"{method} (reference)"
                    )
    _draw(by_time, timed, "seconds / sample (log)", "Gen PPL (log)", log_x=True, log_y=True)
    return _save(fig, path)


def label_steps(ax, steps: Sequence[float]) -> None:
    """One tick per step count actually run, labelled ``T=4``, ``T=8``, ... (no crowded powers of ten)."""
    if not steps:
        return
    ax.set_xticks(list(steps), [f"T={int(t)}" for t in steps])
    ax.xaxis.set_minor_locator(NullLocator())


def plot_entropy_vs_genppl(results: Mapping[str, Sequence[Mapping]], path) -> str:
    """Paper Fig. 4: unigram entropy (bits) against Gen PPL (log-x), one line per method."""
    fig, (ax,) = _new_figure(1)
    _draw(ax, _points(results, "gen_ppl", "entropy"), "Gen PPL", "entropy (bits)", log_x=True)
    return _save(fig, path)


LIKELIHOOD_ROWS = [  # (metrics key, table label): likelihoods and bounds on the NLL
    ("ar", "AR"), ("mdlm", "MDLM"), ("edlm_coar", "EDLM-coAR"),
]
EQ13_ROWS = [  # (metrics key, log Z estimate, energy, how log Z was estimated): estimates, not bounds
    ("edlm_ar", "upper", "EDLM-AR", "Theorem 1 \"upper\" (n negatives; biased high for large n)"),
    ("edlm_ar", "lower", "EDLM-AR", "Theorem 1 \"lower\" (n negatives; biased low)"),
    ("edlm_ar", "plugin", "EDLM-AR", "one negative (the reference code's value; biased low)"),
    ("edlm_nce", "upper", "EDLM-NCE", "Theorem 1 \"upper\" (n negatives; biased high for large n)"),
    ("edlm_nce", "lower", "EDLM-NCE", "Theorem 1 \"lower\" (n negatives; biased low)"),
    ("edlm_nce", "plugin", "EDLM-NCE", "one negative (the reference code's value; biased low)"),
]
EQ13_TITLE = "EDLM-AR and EDLM-NCE: estimates of the paper's Eq. 13 (not bounds on the NLL)"
EQ13_DOCS = Path(__file__).resolve().parents[2] / "docs" / "likelihood_bounds.md"
EQ13_ANCHOR = "eq13-estimates"
NOTES = """Notes (docs/likelihood_bounds.md):
- Per token over all L positions (AR: the L−1 predicted ones); PPL = exp(NLL), bits = NLL / ln 2 (BPC for characters).
- MDLM: one (t, mask) Monte-Carlo term of the NELBO per row; an upper bound on the NLL up to O(ε) truncation.
- EDLM-coAR reduces exactly to the AR likelihood: E[coAR] = (1−ε)·(L−1)/L·AR per token plus pθ's NLL of the
  first token (`ar_prediction_nll` and `position0_nll` in metrics.json; row "predicted from AR").
"""


def docs_link(out: Path) -> str:
    """A markdown link from a report written into ``out`` to the Eq.-13 explanation in the docs: relative
    inside a checkout of the repository, the docs' path otherwise (its text names the file either way)."""
    label = "docs/likelihood_bounds.md, §2.1–2.3"
    if not EQ13_DOCS.is_file():
        return label + " (in the edlm-dist repository)"
    root, out = EQ13_DOCS.parents[1], Path(out).resolve()
    target = os.path.relpath(EQ13_DOCS, out) if out.is_relative_to(root) else EQ13_DOCS.as_uri()
    return f"[{label}]({target}#{EQ13_ANCHOR})"


def eq13_section(lik: dict, out: Path) -> list[str]:
    """The Eq.-13 figures of EDLM-AR / EDLM-NCE in their own table, titled as estimates, the docs one link away."""
    rows = []
    for key, estimate, energy, how in EQ13_ROWS:
        entry = lik["methods"].get(key, {}).get(estimate)
        if entry is not None:
            rows.append({"Energy": energy, "log Z(x_t) estimated by": how,
                         "Eq. 13 (nats/token)": _fmt(entry["nll"], "{:.4f}")})
    if not rows:
        return []
    return [f"\n### {EQ13_TITLE}\n",
            "Eq. 13 puts the *joint* likelihood of the energy-based model where the masked-diffusion NELBO needs "
            "per-token marginals, so these figures are estimates of the Eq.-13 objective, not bounds: they can "
            "fall below the true NLL, below the data's entropy rate, even below 0, and are not perplexities. "
            "\"Upper\" and \"lower\" name Theorem 1's two estimates of log Z(x_t), not bounds on the NLL. Why, "
            f"and what each row is: {docs_link(out)}.\n",
            markdown_table(rows, ["Energy", "log Z(x_t) estimated by", "Eq. 13 (nats/token)"])]


# ----------------------------------------------------------------------------- `edlm eval` report
def _fmt(value, spec: str = "{:.3f}") -> Optional[str]:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _nll_row(label: str, estimate: str, nll: float) -> dict:
    return {"Method": label, "Estimate": estimate, "NLL (nats/token)": _fmt(nll, "{:.4f}"),
            "PPL": _fmt(safe_exp(nll), "{:.2f}"),
            "Bits/token": _fmt(nll / math.log(2), "{:.4f}")}


def likelihood_table(lik: dict) -> str:
    """The validation-likelihood table (likelihoods and NLL bounds, one row per method) of a likelihood result."""
    rows = []
    for key, label in LIKELIHOOD_ROWS:
        entry = lik["methods"].get(key)
        if entry is None:
            continue
        rows.append(_nll_row(label, entry["estimate"], entry["nll"]))
        if key == "edlm_coar" and "ar_prediction_nll" in entry:  # the exact relation, side by side
            rows.append(_nll_row("EDLM-coAR predicted from AR", "(1−ε)(L−1)/L · AR + pθ's first token",
                                 entry["ar_prediction_nll"] + entry["position0_nll"]))
    return markdown_table(rows, ["Method", "Estimate", "NLL (nats/token)", "PPL", "Bits/token"])


def likelihood_section(lik: dict, out: Path) -> list[str]:
    """Heading, provenance line, the likelihood table, the Eq.-13 estimates and the notes of a likelihood result."""
    source = f" of `{lik['data_dir']}`" if lik.get("data_dir") else ""
    return [f"## Validation likelihood\n\n{lik['rows']} rows × {lik['seq_len']} tokens{source}, "
            f"n = {lik['settings']['n_negatives']} negatives, seed {lik['settings']['seed']}.\n",
            likelihood_table(lik), *eq13_section(lik, out), "\n" + NOTES]


def with_interval(row: Mapping, key: str, spec: str = "{:.3f}") -> Optional[str]:
    """``12.340 [11.020, 13.900]`` when the row carries ``<key>_interval`` (``Interval.as_dict``), else the value."""
    interval = row.get(f"{key}_interval")
    if isinstance(interval, Mapping) and row.get(key) is not None:
        return f"{spec.format(row[key])} [{spec.format(interval['low'])}, {spec.format(interval['high'])}]"
    return _fmt(row.get(key), spec)


INTERVALS_NOTE = ("Brackets: 95 % percentile-bootstrap intervals over the samples (2,000 resamples; seconds over "
                  "the timed batches, whose samples share one measurement; `evaluation/intervals.py`).")


def comparison_section(comparisons: Sequence[Mapping], baseline: str) -> list[str]:
    """Each method against the baseline at equal steps: Gen PPL ratio, interval, p-value, Holm-corrected verdict."""
    if not comparisons:
        return []
    rows = [{"method": c["method"], "steps": c["steps"],
             f"Gen PPL ÷ {baseline}'s": f"{c['estimate']:.3f} [{c['low']:.3f}, {c['high']:.3f}]",
             "p": f"{c['p_value']:.4f}", "significant (Holm)": "yes" if c["significant_holm"] else "no"}
            for c in comparisons]
    better = sum(c["significant_holm"] and c["estimate"] < 1 for c in comparisons)
    worse = sum(c["significant_holm"] and c["estimate"] > 1 for c in comparisons)
    return [f"## Each method against {baseline} at equal steps\n",
            f"Gen PPL of the method ÷ {baseline}'s at the same T (< 1: better than {baseline}), its 95 % interval "
            "(the two cells' samples resampled independently, 2,000 times) and the two-sided bootstrap p-value of "
            "\"equal Gen PPL\" (twice the share of resampled ratios on the far side of 1). *Significant (Holm)*: "
            f"p stays below 5 % after Holm's step-down correction over all {len(rows)} comparisons of this table "
            "(family-wise error 5 %); \"no\" means this run cannot tell the two apart. "
            f"Here: {better} significantly better, {worse} significantly worse, "
            f"{len(rows) - better - worse} not significant.\n",
            markdown_table(rows, ["method", "steps", f"Gen PPL ÷ {baseline}'s", "p", "significant (Holm)"])]


def markdown_report(results: dict, out: Path) -> str:
    parts = ["# edlm eval\n"]
    lik = results.get("likelihood")
    if lik:
        parts += likelihood_section(lik, out)
    samples = results.get("samples")
    if samples:
        oracle = next((s.get("oracle") for s in samples if s.get("oracle")), None)
        parts.append(f"\n## Samples\n\nGen PPL oracle: `{oracle or '-'}`; entropy: unigram, bits, mean over samples. "
                     f"{INTERVALS_NOTE}\n")
        columns = ["Method", "Steps", "k", "Window", "Gen PPL", "Entropy (bits)", "s/sample", "Samples", "File"]
        rows = []
        reference = results.get("data_reference")
        if reference:
            split = "training" if reference.get("split") == "train" else "validation"
            rows.append({"Method": f"Data ({split} rows)", "Gen PPL": with_interval(reference, "gen_ppl", "{:.2f}"),
                         "Entropy (bits)": with_interval(reference, "entropy_bits"),
                         "Samples": reference.get("num_samples")})
            if "entropy_rate_ppl" in reference:
                rows.append({"Method": "Data (exact entropy rate)",
                             "Gen PPL": _fmt(reference["entropy_rate_ppl"], "{:.2f}")})
        for s in sorted(samples, key=lambda s: (s["method"], s.get("steps") or 0)):
            rows.append({"Method": s["method"], "Steps": s.get("steps"), "k": s.get("k"), "Window": s.get("window"),
                         "Gen PPL": with_interval(s, "gen_ppl", "{:.2f}"),
                         "Entropy (bits)": with_interval(s, "entropy_bits"),
                         "s/sample": with_interval(s, "seconds_per_sample", "{:.4f}"), "Samples": s["num_samples"],
                         "File": Path(s["file"]).parent.name + "/" + Path(s["file"]).name})
        parts.append(markdown_table(rows, columns))
    if results.get("comparisons"):
        parts += ["", *comparison_section(results["comparisons"], "MDLM")]
    for name, path in results.get("plots", {}).items():
        parts.append(f"\n![{name}]({Path(path).name})\n")
    return "\n".join(parts)


def make_plots(samples: list[dict], out: Path) -> dict[str, str]:
    """Fig. 1a (Gen PPL vs steps and vs s/sample) and Fig. 4 (entropy vs Gen PPL) when steps vary."""
    steps = {s.get("steps") for s in samples if s.get("steps") is not None}
    if len(samples) < 2 or len(steps) < 2 or not any("gen_ppl" in s for s in samples):
        return {}
    by_method: dict[str, list[dict]] = {}
    for s in samples:
        by_method.setdefault(s["method"], []).append(
            {"steps": s.get("steps"), "gen_ppl": s.get("gen_ppl"), "seconds_per_sample": s.get("seconds_per_sample"),
             "entropy": s.get("entropy_bits")})
    plots = {"frontier": plot_frontier(by_method, out / "genppl_frontier.png")}
    if any("entropy_bits" in s for s in samples):
        plots["entropy_vs_genppl"] = plot_entropy_vs_genppl(by_method, out / "entropy_vs_genppl.png")
    return plots


def _finite(obj):
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if results.get("samples"):
        results["plots"] = make_plots(results["samples"], out)
    write_atomic(out / METRICS_REPORT, markdown_report(results, out))
    write_json_atomic(out / METRICS_FILE, _finite(results))  # last: its presence marks finished results


# ----------------------------------------------------------------------------- `edlm pipeline` report
def show_intervals(row: dict) -> dict:
    """Gen PPL, entropy and seconds per sample of a result row as 'value [low, high]' where intervals exist."""
    return {**row, "gen_ppl": with_interval(row, "gen_ppl", "{:.2f}"), "entropy": with_interval(row, "entropy"),
            "seconds_per_sample": with_interval(row, "seconds_per_sample", "{:.4f}")}


def write_pipeline_report(results: dict, methods: Sequence[str], out: Path, settings_line: str, *,
                          title: str = "EDLM vs MDLM on the synthetic language (exact oracle)",
                          data_label: str = "data (exact)", extra_lines: Sequence[str] = ()) -> None:
    """``results.md``, ``frontier.png`` and ``entropy_vs_genppl.png`` of a pipeline run (``extra_lines``
    follow the samples table)."""
    curves = {m: results["methods"][m] for m in methods if m in results["methods"]}
    plot_frontier(curves, out / "frontier.png")
    plot_entropy_vs_genppl(curves, out / "entropy_vs_genppl.png")
    rows = [show_intervals({"method": method, **row}) for method, series in curves.items() for row in series]
    rows.append(show_intervals({"method": data_label, **results["data"]}))
    lines = [f"# {title}", "", settings_line, "", INTERVALS_NOTE,
             "`ar`: the AR baseline sampler (spec §5.7, KV cache).", "",
             markdown_table(rows, ["method", "steps", "gen_ppl", "nll_per_token", "entropy", "seconds_per_sample",
                                   "sequential_calls", "k", "window"]), "", *extra_lines]
    lines += comparison_section(results.get("comparisons", []), "mdlm") + [""]
    if "prompted" in results:
        lines += prompted_section(results["prompted"]) + [""]
    if "likelihood" in results:
        lines += likelihood_section(results["likelihood"], out) + [""]
    write_atomic(out / PIPELINE_REPORT, "\n".join(lines))


def prompted_section(cell: dict) -> list[str]:
    """The pipeline's prompted-generation cell: conditional Gen PPL per method and a few samples as text."""
    rows = []
    for method, m in cell["methods"].items():
        shown = show_intervals(m)
        rows.append({"method": method, "cond_gen_ppl": shown["gen_ppl"], "cond_nll_per_token": m["nll_per_token"],
                     "entropy": shown["entropy"], "seconds_per_sample": shown["seconds_per_sample"],
                     "sequential_calls": m.get("mean_sequential_calls")})
    data = cell["data"]
    rows.append({"method": "data (held-out continuations)", "cond_gen_ppl": data["gen_ppl"],
                 "cond_nll_per_token": data["nll_per_token"], "entropy": data.get("entropy_bits")})
    lines = ["## Prompted generation", "",
             f"{len(cell['prompts'])} prompts (the first {cell['prompt_tokens']} tokens of validation "
             f"rows, BOS included), {cell['samples_per_prompt']} samples each; diffusion samplers at T = "
             f"{cell['steps']}. Conditional Gen PPL = exp(−log p(continuation | prompt) per generated token), exact.",
             "", markdown_table(rows, ["method", "cond_gen_ppl", "cond_nll_per_token", "entropy",
                                       "seconds_per_sample", "sequential_calls"]), "Samples (generated spans in [[ ]]):", ""]
    for method, m in cell["methods"].items():
        lines += [f"* {method}: `{text}`" for text in m.get("examples", [])]
    return lines
