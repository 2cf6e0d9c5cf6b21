"""MDLM, AR and NCE models learn the synthetic language; a NaN loss stops the run before the update."""

from __future__ import annotations

import json

import pytest
import torch

from edlm_dist.config.load import load_config
from edlm_dist.errors import TrainingError
from tests.spawn import run_on_ranks

from training_helpers import tiny_overrides


def _train(out_dir, overrides):
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, out_dir, init_parallel(cfg))
    initial = trainer.validate()
    last = trainer.train()
    trainer.close()
    return initial, last["val_loss"]


def _val_losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["val_loss"] for row in rows if "val_loss" in row]


@pytest.fixture(scope="module")
def trained_mdlm(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mdlm")
    overrides = tiny_overrides(synthetic_data, **{"train.steps": 250, "train.val_every": 125})
    initial, final = run_on_ranks(_train, 1, out, overrides)[0]
    return out, initial, final


def test_mdlm_learns(trained_mdlm):
    out, initial, final = trained_mdlm
    # The untrained DiT predicts uniformly (zero-init head): NELBO/token ~ E[1/t * masked] * log V.
    assert final < initial - 0.4, (initial, final)
    assert (out / "weights" / "ema.safetensors").is_file()


def test_ar_learns_down_towards_the_entropy_floor(synthetic_data, tmp_path):
    from edlm_dist.config.schema import SyntheticConfig
    from edlm_dist.data.synthetic import SyntheticLanguage

    overrides = tiny_overrides(synthetic_data, **{"train.objective": "ar", "train.steps": 250, "train.val_every": 125})
    initial, final = run_on_ranks(_train, 1, tmp_path, overrides)[0]
    entropy, stderr = SyntheticLanguage(SyntheticConfig(), 32).entropy_per_token()
    assert initial == pytest.approx(torch.log(torch.tensor(35.0)).item(), abs=0.05)  # zero-init head: uniform
    assert final < 0.7 * initial
    # No model beats the true entropy rate: 512 validation rows x 31 tokens, per-token sd ~ 1.5 nats.
    assert final > entropy - 0.15, (final, entropy)


def test_nce_energy_learns_from_the_trained_diffusion(trained_mdlm, synthetic_data, tmp_path):
    mdlm_dir, _, _ = trained_mdlm
    overrides = tiny_overrides(synthetic_data, **{"train.objective": "nce", "train.steps": 120,
                                                  "train.val_every": 60, "train.diffusion_ckpt": str(mdlm_dir),
                                                  "train.n_negatives": 2})
    initial, final = run_on_ranks(_train, 1, tmp_path, overrides)[0]
    # Zero-init final layer: one constant energy c for every input, so the Eq. 10 loss starts at
    # softplus(c) + softplus(-c) >= 2 log 2, which no input-independent energy can beat.
    assert initial >= 2 * torch.log(torch.tensor(2.0)).item() - 1e-6
    assert final < 2 * torch.log(torch.tensor(2.0)).item() - 0.05, (initial, final)


def _nan_run(out_dir, overrides):
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, out_dir, init_parallel(cfg))
    original = trainer.objective.loss
    calls = {"n": 0}

    def poisoned(model, batch, generator):
        calls["n"] += 1
        loss, stats = original(model, batch, generator)
        return (loss * float("nan") if calls["n"] == 13 else loss), stats  # micro-step 13 = step 7

    trainer.objective.loss = poisoned
    try:
        trainer.train()
    except TrainingError as exc:
        weights = [p.detach().clone() for p in trainer.engine.module.parameters()]
        return str(exc), all(torch.isfinite(w).all() for w in weights), trainer.step
    return None, None, None


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(synthetic_data, tmp_path):
    overrides = tiny_overrides(synthetic_data, **{"train.steps": 20, "train.save_every": 4})
    message, weights_finite, step = run_on_ranks(_nan_run, 1, tmp_path, overrides)[0]
    assert message is not None, "training did not stop on a NaN loss"
    assert "loss is nan at step 7" in message and "step_00000004" in message and "\n" not in message
    assert weights_finite and step == 6
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
