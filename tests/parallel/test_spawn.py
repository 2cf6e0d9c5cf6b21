"""The multi-rank helper itself: results come back, failures carry the rank's message."""

from __future__ import annotations

import os
import time

import pytest

from tests.spawn import RankFailure, run_on_ranks

pytestmark = pytest.mark.multirank


def _report_rank():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _fail_on_rank_one():
    if os.environ["RANK"] == "1":
        assert 1 + 1 == 3, "rank one computed arithmetic wrong"
    return "fine"


def _hang_on_rank_one():
    if os.environ["RANK"] == "1":
        time.sleep(60)
    return "done"


def _die_on_rank_one():
    if os.environ["RANK"] == "1":
        os._exit(9)
    return "done"


def test_results_are_returned_per_rank():
    assert run_on_ranks(_report_rank, 3) == [(0, 3), (1, 3), (2, 3)]


def _tensor_result():
    import torch

    return torch.arange(1000, dtype=torch.float64) * (int(os.environ["RANK"]) + 1)


def test_tensor_results_come_back_by_value_not_as_descriptors_of_an_exited_rank():
    """torch's queue pickler would send a tensor as a shared-memory descriptor that the parent must
    fetch from the rank; the rank exits right after reporting, so under load that fetch hit EOFError."""
    import torch

    results = run_on_ranks(_tensor_result, 2)
    for rank, tensor in enumerate(results):
        assert torch.equal(tensor, torch.arange(1000, dtype=torch.float64) * (rank + 1))
        assert not tensor.is_shared()  # a private copy: nothing left to fetch from the exited rank


def test_assertion_message_is_propagated():
    with pytest.raises(RankFailure, match="rank 1 of 2 failed(.|\n)*rank one computed arithmetic wrong"):
        run_on_ranks(_fail_on_rank_one, 2)


def test_hung_rank_times_out_with_a_clear_message():
    with pytest.raises(RankFailure, match=r"ranks \[1\] did not finish within 3 s"):
        run_on_ranks(_hang_on_rank_one, 2, timeout=3)


def test_dead_rank_is_reported():
    with pytest.raises(RankFailure, match=r"ranks \[1\] died without reporting \(exit codes \{1: 9\}\)"):
        run_on_ranks(_die_on_rank_one, 2)
