"""launchers/slurm.py beyond one training run, on a real two-node Slurm cluster (see slurm_helpers.py):
a `--sweep` job array, and `edlm sample` (EDLM, proposals spread over the 2 nodes) and `edlm eval` as
SLURM jobs, whose results are those of the same commands run as one process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from slurm_helpers import (CONFIG, JOB_TIMEOUT_S, losses, on_cluster, outcome_and_result, prepare, require_cluster,
                           slurm, train_overrides)

from edlm_dist.cli import main as edlm
from tests.spawn import run_on_ranks

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    require_cluster()
    return prepare(tmp_path_factory.mktemp("slurm_jobs_data"))


def test_sweep_is_one_array_with_a_folder_and_a_result_per_value(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    # A MASTER_PORT in the submitting shell travels into the jobs (sbatch --export=ALL); the two array tasks
    # start at once on this host and must still get ports of their own.
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = [CONFIG, "--out", str(out), *train_overrides(data_dir, **{"train.steps": 4, "train.save_every": 4}),
            *on_cluster(nodes=1), "--sweep", "train.lr=1e-3,3e-3"]
    assert slurm.main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert slurm.main([*args, "--wait"]) == 0
    (array_id,) = re.findall(r"submitted job (\d+)_0;", capsys.readouterr().out)
    submitted = (out / "submitit" / array_id / f"{array_id}_submission.sh").read_text()
    assert submitted == dry.split("\n# task 0")[0].rstrip("\n") + "\n"  # --dry-run shows exactly what is submitted
    assert "#SBATCH --array=0-1%2" in submitted
    lr_at_step_1 = {}
    for task, value in enumerate(("1e-3", "3e-3")):
        folder = out / f"train.lr={value}"
        ((outcome, result),) = [outcome_and_result(p) for p in (out / "submitit" / f"{array_id}_{task}").glob("*.pkl")
                                if p.name.endswith("_result.pkl")]
        assert outcome == "success" and result["out"] == str(folder) and result["step"] == 4
        assert f"lr: {float(value)}" in (folder / "config.yaml").read_text()
        assert [s for s, _ in losses(folder)] == [1, 2, 3, 4] and (folder / "weights" / "model.safetensors").is_file()
        lr_at_step_1[value] = next(row["lr"] for row in map(json.loads, (folder / "metrics.jsonl").read_text()
                                                            .splitlines()) if row.get("step") == 1 and "lr" in row)
    assert lr_at_step_1["3e-3"] == pytest.approx(3 * lr_at_step_1["1e-3"], rel=1e-12)  # same schedule, 3x the lr


def _train(config: str, out: str, overrides: list[str]) -> bool:
    from edlm_dist.config.load import load_config
    from edlm_dist.training.trainer import train

    train(load_config(config, overrides), out)
    return True


def _edlm_command(argv: list[str]) -> int:
    return edlm(argv)


@pytest.fixture(scope="module")
def models(data_dir, tmp_path_factory):
    """A tiny MDLM and a tiny AR model (one process each)."""
    root = tmp_path_factory.mktemp("slurm_models")
    runs = {"mdlm": str(root / "mdlm"), "ar": str(root / "ar")}
    quiet = {"train.steps": 10, "train.save_every": 10, "train.log_every": 10, "train.global_batch": 8}
    run_on_ranks(_train, 1, CONFIG, runs["mdlm"], train_overrides(data_dir, **quiet), timeout=300)
    run_on_ranks(_train, 1, CONFIG, runs["ar"], train_overrides(data_dir, **quiet, **{"train.objective": "ar"}),
                 timeout=300)
    return runs


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}/").items()}
    return {prefix: tree} if isinstance(tree, float) else {}


def test_sample_and_eval_jobs_on_two_nodes_equal_one_process(data_dir, models, tmp_path):
    sample = ["logging.progress=false", "sample.sampler=edlm", "sample.energy=ar", f"sample.ar_ckpt={models['ar']}",
              f"sample.diffusion_ckpt={models['mdlm']}", "sample.k=4", "sample.window=0.5", "sample.steps=6",
              "sample.num_samples=6", "sample.batch_size=3", "sample.seed=7"]
    one = tmp_path / "sample_one"
    assert edlm(["sample", CONFIG, "--out", str(one), *sample]) == 0
    evaluate = ["logging.progress=false", f"data.dir={data_dir}", f"eval.diffusion_ckpt={models['mdlm']}",
                f"eval.ar_ckpt={models['ar']}", "eval.metrics=[ppl,genppl,entropy]", "eval.n_negatives=4",
                "eval.batch_size=8", f"eval.samples=[{one / 'samples.jsonl'}]"]
    assert run_on_ranks(_edlm_command, 1, ["eval", CONFIG, "--out", str(tmp_path / "eval_one"), *evaluate]) == [0]

    # Both jobs at once: 1 CPU per task, so each node runs one task of each.
    cluster = on_cluster(cpus=1)
    (sample_job,) = slurm.submit(CONFIG, str(tmp_path / "sample_two"), [*sample, *cluster], command="sample")
    (eval_job,) = slurm.submit(CONFIG, str(tmp_path / "eval_two"), [*evaluate, *cluster], command="eval")
    slurm.wait([sample_job, eval_job], timeout_s=JOB_TIMEOUT_S)
    for job in (sample_job, eval_job):
        assert job.state == "COMPLETED", slurm.describe_failure(job)
        assert sorted((r["rank"], r["node"]) for r in job.results()) == [(0, "n1"), (1, "n2")]

    # EDLM over 2 nodes: one proposal group of 2 ranks (k = 4 proposals, 2 per node); sample i depends only
    # on (models, settings, seed, i), so the rows are the one-process rows, token for token.
    def rows(folder: Path):
        summary = json.loads((folder / "summary.json").read_text())
        return [json.loads(line)["tokens"] for line in (folder / "samples.jsonl").read_text().splitlines()], summary

    (tokens_two, summary_two), (tokens_one, summary_one) = rows(tmp_path / "sample_two"), rows(one)
    assert (summary_two["world_size"], summary_two["proposal_parallel"], summary_one["world_size"]) == (2, 2, 1)
    assert tokens_two == tokens_one and len(tokens_one) == 6
    assert summary_two["mean_ess"] == pytest.approx(summary_one["mean_ess"], rel=1e-5)  # fp32 energies (sampling.md)

    # Eval: validation rows and samples split over 2 ranks, float64 sums all-reduced. The fp32 model rows see
    # other batch shapes than in one process, hence 1e-6 relative (a few fp32 ulps summed over the rows).
    one_metrics = json.loads((tmp_path / "eval_one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "eval_two" / "metrics.json").read_text())
    assert (one_metrics["settings"]["world_size"], two_metrics["settings"]["world_size"]) == (1, 2)
    nums_one = {k: v for k, v in _numbers(one_metrics).items() if not k.startswith("settings/")}
    nums_two = {k: v for k, v in _numbers(two_metrics).items() if not k.startswith("settings/")}
    assert nums_one.keys() == nums_two.keys() and len(nums_one) > 20
    for key, value in nums_one.items():
        assert nums_two[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
