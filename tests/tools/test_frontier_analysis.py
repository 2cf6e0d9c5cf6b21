"""The frontier's speed-up arithmetic (tools/frontier/analysis.py) on hand-made curves with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from tools.frontier.analysis import build_replicates, merge_runs, reach, speedup


def test_reach_interpolates_in_log_log_along_t():
    ppl = torch.tensor([[100.0, 20.0, 10.0]], dtype=torch.float64)
    cost = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    at = lambda g: float(reach(ppl, cost, torch.tensor([g], dtype=torch.float64))[0])  # noqa: E731
    assert at(200.0) == 1.0 and at(20.0) == 2.0 and at(10.0) == 4.0  # points reached exactly
    assert math.isclose(at(math.sqrt(200.0)), math.sqrt(8.0))  # halfway in log PPL -> halfway in log cost
    assert math.isinf(at(5.0))  # never reached


def _setting(family: str, steps: int, nll_per_row: float, seconds: float, calls: float) -> dict:
    runs = [{"seed": s, "nll": [nll_per_row] * 4, "scored_tokens": 10, "seconds": seconds, "cpu_seconds": seconds,
             "calls": calls, "tokens": 10 * calls} for s in (1, 2)]
    return {"method": {"family": family, "curve": family, "name": f"{family} T={steps}", "steps": steps},
            "seeds": runs}


def test_speedup_at_the_reference_best_quality():
    """MDLM reaches its best Gen PPL e^2 at 8 s; EDLM reaches e^2 halfway (in log PPL) between its T=1 (e^3, 1 s)
    and T=2 (e^1, 4 s) points, i.e. at 2 s: a speed-up of 4 with every row identical (no spread)."""
    results = [_setting("mdlm", 4, 40.0, 4.0, 4), _setting("mdlm", 8, 20.0, 8.0, 8),
               _setting("edlm", 1, 30.0, 1.0, 1), _setting("edlm", 2, 10.0, 4.0, 4)]
    rep = build_replicates(results, n_resamples=50)
    target = rep.ppl[:, [0, 1]].min(dim=1).values
    assert torch.allclose(target, torch.full_like(target, math.exp(2.0)))
    out = speedup(rep, ("mdlm",), ("edlm",), target)
    assert math.isclose(out["seconds"]["estimate"], 4.0) and math.isclose(out["calls"]["estimate"], 4.0)
    assert math.isclose(out["seconds"]["low"], 4.0) and math.isclose(out["seconds"]["high"], 4.0)
    assert out["seconds"]["reached"] == 1.0 and out["seconds"]["candidate_curve"] == "edlm"


def _payload(seed: int, names=("mdlm T=4", "edlm T=1")) -> dict:
    results = [{"method": {"name": name}, "seeds": [{"seed": seed, "nll": [float(seed)]}]} for name in names]
    return {"title": f"L = 8, batch 2, seeds [{seed}], 1 samples per setting and seed, sweep 5 s", "length": 8,
            "batch_size": 2, "energies": ["ar"], "results": results}


def test_merge_runs_concatenates_seeds_setting_by_setting_and_refuses_mismatches():
    merged = merge_runs([_payload(1), _payload(2), _payload(3)])
    assert [[run["seed"] for run in entry["seeds"]] for entry in merged["results"]] == [[1, 2, 3], [1, 2, 3]]
    assert "seeds [1, 2, 3]" in merged["title"] and merged["length"] == 8
    for bad in ([_payload(1), _payload(1)], [_payload(1), _payload(2, names=("mdlm T=4",))]):
        with pytest.raises(SystemExit, match="error:"):
            merge_runs(bad)


def test_merge_runs_joins_different_settings_on_the_same_seeds():
    extra = {**_payload(1, names=("edlm-nce T=32",)), "energies": ["nce"]}
    merged = merge_runs([_payload(1), extra])
    assert [entry["method"]["name"] for entry in merged["results"]] == ["mdlm T=4", "edlm T=1", "edlm-nce T=32"]
    assert merged["energies"] == ["ar", "nce"]
    for bad in ([_payload(1), _payload(2, names=("edlm-nce T=32",))],  # other seeds: not paired
                [_payload(1), {**_payload(1, names=("x",)), "batch_size": 1}]):
        with pytest.raises(SystemExit, match="error:"):
            merge_runs(bad)


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def test_summary_is_strict_json_with_null_for_costs_never_reached():
    import json
    from pathlib import Path

    from tools.frontier.__main__ import _finite_or_null

    cleaned = _finite_or_null({"a": math.inf, "b": [1.5, -math.inf, {"c": math.nan}], "d": "x"})
    assert cleaned == {"a": None, "b": [1.5, None, {"c": None}], "d": "x"}
    committed = Path(__file__).resolve().parents[2] / "docs" / "frontier_summary.json"
    json.loads(committed.read_text(), parse_constant=_refuse_constant)  # what a strict parser accepts
