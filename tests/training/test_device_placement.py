"""A training run places every tensor and generator on the run's device explicitly, so the first GPU run
does not crash on a CPU generator or a CPU tensor in an NCCL collective (issue 21, items 1, 2, 9).

On CPU the run's device and the default device are both the CPU, which hides a missing ``device=``. These
tests pull them apart: the default device is ``meta`` for the whole run (a tensor built without a device
lands there and the run fails), and every ``torch.Generator`` built during the run is recorded with the
device it was asked for. Resume loads files that claim to come from a GPU.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.serialization as serialization

from edlm_dist.config.load import load_config
from tests.spawn import run_on_ranks
from tests.training.training_helpers import tiny_overrides

pytestmark = pytest.mark.multirank


def _record_generators() -> list:
    """Replace torch.Generator by a subclass that records the device each generator was asked for."""
    asked: list = []
    base = torch.Generator

    class RecordingGenerator(base):
        def __new__(cls, device=None):
            asked.append(None if device is None else str(torch.device(device)))
            return base.__new__(cls, device="cpu" if device is None else device)

        def __init__(self, device=None):
            pass

    torch.Generator = RecordingGenerator  # this forked rank only
    return asked


def _run(data_dir, out, objective, steps, extra=()):
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.trainer import Trainer

    cfg = load_config(None, tiny_overrides(data_dir, **{
        "train.objective": objective, "train.steps": steps, "train.val_every": 1, "train.save_every": 1,
        "model.dropout": 0.1, **dict(extra)}))
    trainer = Trainer(cfg, out, init_parallel(cfg))
    try:
        with torch.device("meta"):  # the default device is not the run's device
            return trainer.train(stop_after=1)
    finally:
        trainer.close()


def _train_validate_resume_nce(data_dir, root):
    from edlm_dist.parallel.runtime import current_context, init_parallel

    init_parallel(load_config(None, tiny_overrides(data_dir)))
    asked = _record_generators()
    first = _run(data_dir, root / "mdlm", "mdlm", 2)  # step 1, checkpoint, validation, preemption check
    resumed = _run(data_dir, root / "mdlm", "mdlm", 2)  # resumes step 1, runs step 2, exports weights
    nce = _run(data_dir, root / "nce", "nce", 1, {"train.diffusion_ckpt": str(root / "mdlm"), "train.n_negatives": 2})
    return str(current_context().device), asked, [first["loss"], resumed["loss"], nce["loss"]]


def test_training_places_every_tensor_and_generator_on_the_run_device(synthetic_data, tmp_path):
    for device, asked, losses in run_on_ranks(_train_validate_resume_nce, 2, synthetic_data, tmp_path, timeout=600):
        assert all(torch.isfinite(torch.tensor(losses)))
        assert asked, "the run built no generator: the recorder did not see the training noise"
        assert set(asked) == {device}, f"generators built for devices {asked}, the run's device is {device}"


# ----------------------------------------------------------------------------- files saved on a GPU
def _resave_as_if_on(path, location: str) -> None:
    """Rewrite a torch.save file so that every tensor claims to live on ``location`` (e.g. cuda:1)."""
    obj = torch.load(path, weights_only=False)

    def tag(storage):
        return location if storage.device.type == "cpu" else None

    serialization.register_package(1, tag, lambda storage, where: None)
    try:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not tag]
    path.write_bytes(buffer.getvalue())


def _train(data_dir, out, steps):
    from edlm_dist.parallel.runtime import init_parallel
    from edlm_dist.training.trainer import Trainer

    cfg = load_config(None, tiny_overrides(data_dir, **{"train.steps": steps, "train.save_every": 1}))
    trainer = Trainer(cfg, out, init_parallel(cfg))
    try:
        trainer.train(stop_after=1)
        return trainer.step, [s.device.type for s in trainer.ema.shadow]
    finally:
        trainer.close()


def test_resume_reads_rank_and_ema_files_written_on_a_gpu(synthetic_data, tmp_path):
    run_on_ranks(_train, 1, synthetic_data, tmp_path, 2)
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    for name in ("rank_00000.pt", "ema_tp00.pt"):
        _resave_as_if_on(checkpoint / name, "cuda:1")
    with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
        torch.load(checkpoint / "ema_tp00.pt", weights_only=False)  # what a load without map_location meets
    step, shadow_devices = run_on_ranks(_train, 1, synthetic_data, tmp_path, 2)[0]
    assert step == 2 and set(shadow_devices) == {"cpu"}  # the shadow stays on this run's device
