"""Markdown tables and PNG plots."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from edlm_dist.errors import DataError
from edlm_dist.evaluation.report import (
    EQ13_ANCHOR,
    EQ13_DOCS,
    docs_link,
    markdown_table,
    plot_entropy_vs_genppl,
    plot_frontier,
    with_interval,
)

RESULTS = {
    "MDLM": [
        {"steps": 512, "gen_ppl": 52.4, "seconds_per_sample": 8.5, "entropy": 7.8},
        {"steps": 1024, "gen_ppl": 42.6, "seconds_per_sample": 17.0, "entropy": 7.6},
    ],
    "EDLM-NCE": [
        {"steps": 1024, "gen_ppl": 25.5, "seconds_per_sample": 21.0, "entropy": 7.3},
        {"steps": 512, "gen_ppl": 42.5, "seconds_per_sample": 10.0, "entropy": 7.6},
    ],
    "AR": [{"steps": 1024, "gen_ppl": 35.7, "seconds_per_sample": None, "entropy": 8.1}],
}


def test_markdown_table():
    rows = [{"method": "MDLM", "steps": 1024, "gen_ppl": 42.6}, {"method": "A|B", "gen_ppl": 25.5, "extra": 1}]
    text = markdown_table(rows, ["method", "steps", "gen_ppl"])
    assert text.splitlines() == [
        "| method | steps | gen_ppl |",
        "|---|---|---|",
        "| MDLM | 1024 | 42.600 |",
        "| A\\|B | - | 25.500 |",
    ]
    with pytest.raises(DataError, match="column"):
        markdown_table(rows, [])


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("plot", [plot_frontier, plot_entropy_vs_genppl])
def test_plots_write_png(tmp_path, plot):
    path = tmp_path / "figs" / f"{plot.__name__}.png"
    assert plot(RESULTS, path) == str(path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_plot_rejects_points_without_metrics(tmp_path):
    with pytest.raises(DataError, match="EDLM"):
        plot_frontier({"EDLM": [{"entropy": 7.0}]}, tmp_path / "x.png")


def test_eq13_docs_link_opens_the_explanation_from_inside_and_outside_the_checkout(tmp_path):
    """The link under the Eq.-13 table reaches the docs' anchor: relative from a run folder in the checkout
    (runs/demo), the file's URI from elsewhere; the anchor exists in the docs."""
    assert f'<a id="{EQ13_ANCHOR}"></a>' in EQ13_DOCS.read_text()
    inside = EQ13_DOCS.parents[1] / "runs" / "demo"
    target = re.fullmatch(rf"\[docs/likelihood_bounds.md, §2.1–2.3\]\((.*)#{EQ13_ANCHOR}\)", docs_link(inside)).group(1)
    assert not os.path.isabs(target) and (inside / target).resolve() == EQ13_DOCS
    outside = re.search(rf"\((.*)#{EQ13_ANCHOR}\)", docs_link(tmp_path)).group(1)
    assert outside == EQ13_DOCS.as_uri()


def test_values_show_their_interval_when_they_have_one():
    row = {"gen_ppl": 12.3456, "gen_ppl_interval": {"estimate": 12.3456, "low": 10.0, "high": 15.5, "level": 0.95},
           "entropy": 4.0, "seconds_per_sample": None}
    assert with_interval(row, "gen_ppl", "{:.2f}") == "12.35 [10.00, 15.50]"
    assert with_interval(row, "entropy") == "4.000" and with_interval(row, "seconds_per_sample") is None
