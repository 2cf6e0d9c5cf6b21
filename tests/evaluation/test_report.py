"""Markdown tables and PNG plots."""
from __future__ import annotations

import pytest

from edlm_dist.errors import DataError
from edlm_dist.evaluation.report import markdown_table, plot_entropy_vs_genppl, plot_frontier

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
