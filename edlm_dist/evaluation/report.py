"""Result reports: markdown tables and the paper's quality/speed plots (Fig. 1a, Fig. 4).

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so
they work headless and from several threads.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from edlm_dist.errors import DataError


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
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * ncols, 4.0), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _draw(ax, series, xlabel: str, ylabel: str, log_x: bool, log_y: bool = False) -> None:
    for method, pairs in series.items():
        if pairs:
            xs, ys = zip(*pairs)
            ax.plot(xs, ys, marker="o", label=method)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_frontier(results: Mapping[str, Sequence[Mapping]], path) -> str:
    """Paper Fig. 1a: Gen PPL vs sampling steps and vs seconds/sample, one line per method, log-x.

    results: method name -> list of dicts with keys steps, gen_ppl, seconds_per_sample, entropy
    (a missing/None value drops that point from the panel that needs it). Returns the PNG path.
    """
    fig, (by_steps, by_time) = _new_figure(2)
    _draw(by_steps, _points(results, "steps", "gen_ppl"), "sampling steps T", "Gen PPL", log_x=True)
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
    _draw(by_time, timed, "seconds / sample", "Gen PPL", log_x=True)
    return _save(fig, path)


def plot_entropy_vs_genppl(results: Mapping[str, Sequence[Mapping]], path) -> str:
    """Paper Fig. 4: unigram entropy (bits) against Gen PPL (log-x), one line per method."""
    fig, (ax,) = _new_figure(1)
    _draw(ax, _points(results, "gen_ppl", "entropy"), "Gen PPL", "entropy (bits)", log_x=True)
    return _save(fig, path)
