"""Every reliability scenario (tests/reliability) as a test: faults end resumable and bit-exact,
bad inputs are refused before work starts with one line naming the fix (docs/reliability.md)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.reliability.bad_inputs import cli_refusal, train_argv
from tests.reliability.faults import all_scenarios, run_scenario
from tests.reliability.harness import Workspace, compare_to_reference, warm_imports

SCENARIOS = all_scenarios()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    """One prepared dataset and one uninterrupted reference run per session, shared by every scenario."""
    warm_imports()
    return Workspace(tmp_path_factory.mktemp("reliability"))


def _param(scenario):
    marks = [pytest.mark.multirank] if scenario.ranks > 1 else []
    return pytest.param(scenario, id=scenario.name, marks=marks)


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
def test_scenario(workspace, scenario):
    observation, _ = run_scenario(scenario, workspace)
    assert observation.passed, f"expected: {scenario.expected}\nobserved: {observation.observed}"


def test_registry_covers_the_issue():
    kinds = Counter(s.kind for s in SCENARIOS)
    assert kinds["fault"] >= 30 and kinds["bad input"] >= 60 and len(SCENARIOS) >= 76, kinds  # issue 19
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS), "scenario names must be unique"


def test_bit_exact_comparison_can_fail(workspace):
    """The resume oracle is not vacuous: a run with another seed differs from the reference."""
    out = workspace.fresh("other_seed")
    assert workspace.train(out, "train.seed=2")[0].exit_code == 0
    same, how = compare_to_reference(out, workspace.reference())
    assert not same and "uninterrupted run logged" in how, how


def test_refusal_check_can_fail(workspace):
    """A valid command that runs to the end is not mistaken for a refusal."""
    accepted = cli_refusal("valid_command", "a valid run", r"never", "never",
                           lambda ws, case: train_argv(ws, case, "train.steps=1"))
    observation, _ = run_scenario(accepted, workspace)
    assert not observation.passed and observation.observed.startswith("exit 0"), observation.observed
