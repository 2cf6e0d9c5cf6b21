"""Consolidate a DeepSpeed checkpoint (``OUT/checkpoints/step_X``) into full fp32 weights.

Training writes ``OUT/weights`` only when it finishes; a checkpoint taken mid-run (or the last one
of a preempted run) holds the weights split three ways: ZeRO partitions over the data-parallel
ranks (optimizer files), Megatron shards over the tensor-parallel ranks (``mp_rank_XX``) and the
EMA shadow per TP rank (``ema_tpXX.pt``). :func:`checkpoint_to_weights` undoes all three and writes
the same ``weights`` folder training writes (``model.safetensors``, ``ema.safetensors``,
``meta.json``), so sampling, eval and ``edlm export-hf`` read it unchanged.

* ZeRO partitions: DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` (stages 1-3, and bf16 runs,
  whose fp32 master copy lives in the optimizer files), run on one TP rank's files at a time
  (it cannot tell TP ranks apart). Stage 0 in fp32 keeps the whole fp32 module in
  ``mp_rank_XX_model_states.pt`` and is read from there.
* TP shards: joined with the partition dim/stride Megatron records on each parameter of a dense
  (TP=1) model of the same shape, as :func:`edlm_dist.parallel.sharded_state.gather_full_tensor` does, and
  the vocabulary padding is trimmed.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from edlm_dist.artifacts import checkpoint as ckpt
from edlm_dist.artifacts.readers import guarded, load_torch_file
from edlm_dist.artifacts.weights import weights_meta, write_weights_folder
from edlm_dist.config.load import config_from_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.shards import load_manifest
from edlm_dist.errors import CheckpointError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import VOCAB_ROWS_ATTR, is_tp_sharded

INCOMPLETE = "the checkpoint is incomplete or corrupt; use an earlier one"
CHECKPOINT_MARKER = "signature"  # key of a checkpoint's meta.json (weights' meta.json has "kind" instead)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder (``OUT/checkpoints/step_X``), ``OUT/checkpoints`` or a run folder ``OUT``."""
    path = Path(path)
    if (path / ckpt.META_FILE).is_file() and CHECKPOINT_MARKER in ckpt.read_meta(path):
        return path
    for root in (path, path.parent):
        latest = ckpt.latest_checkpoint(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"no DeepSpeed checkpoint at '{path}' (nor trained weights; expected OUT/weights, "
                          "OUT/checkpoints/latest or OUT/checkpoints/step_X); pass the --out folder of `edlm train`")


def _checkpoint_layout(step_dir: Path) -> tuple[dict, RunConfig, int]:
    meta = ckpt.read_meta(step_dir)
    cfg = config_from_dict(meta["config"])
    tp = cfg.parallel.tp
    found = sorted(step_dir.glob("*mp_rank_*_model_states.pt"))
    if not found:
        raise CheckpointError(f"{step_dir} has no DeepSpeed model states (*mp_rank_XX_model_states.pt); "
                              "the checkpoint is incomplete, use an earlier one")
    return meta, cfg, tp


def _tp_rank_fp32_state(step_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """Full-over-ZeRO, TP-local fp32 tensors of one tensor-parallel rank."""
    tag = f"mp_rank_{tp_rank:02d}"
    optim_files = sorted(step_dir.glob(f"*{tag}_optim_states.pt"))
    if not optim_files:  # ZeRO-0 fp32: the module state dict is the full fp32 weight
        model_file = step_dir / f"{tag}_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{model_file} is missing; the checkpoint is incomplete, use an earlier one")
        state = load_torch_file(model_file, what="DeepSpeed model state", fix=INCOMPLETE, required=("module",))["module"]
        return {k: v.float() for k, v in state.items()}
    # DeepSpeed globs every *_optim_states.pt of the folder; show it one TP rank's files only.
    with tempfile.TemporaryDirectory(prefix="edlm-zero-") as tmp:
        view = Path(tmp) / tag
        view.mkdir()
        for file in step_dir.glob(f"*{tag}_*states.pt"):
            os.symlink(file.resolve(), view / file.name)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
            state = guarded(lambda: get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag),
                            what=f"DeepSpeed could not consolidate {step_dir}",
                            fix="the checkpoint is incomplete, corrupt or from another DeepSpeed version; use an "
                                "earlier one")
    return {k: v.float() for k, v in state.items()}


def _join_tp_shards(shards: list[torch.Tensor], reference: torch.nn.Parameter) -> torch.Tensor:
    """Megatron's strided split undone (shard r holds chunks r, r+tp, ...), vocabulary padding trimmed."""
    if len(shards) == 1 or not is_tp_sharded(reference):  # TP=1 has no padding; replicated params are equal
        return shards[0].contiguous()
    dim, stride = reference.partition_dim, reference.partition_stride
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    full = torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)
    rows = getattr(reference, VOCAB_ROWS_ATTR, None)
    return full.narrow(dim, 0, rows).contiguous() if rows is not None else full.contiguous()


def _reference_model(cfg: RunConfig, signature: dict, *, with_attributes: bool) -> torch.nn.Module:
    """A dense model of the checkpoint's shape: parameter names, order and (if built for real) TP attributes."""
    return build_model(signature["kind"], cfg.model, int(signature["vocab_size"]), int(signature["seq_len"]),
                       meta=not with_attributes)


def consolidate_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor],
                                                             Optional[dict[str, torch.Tensor]], dict]:
    """``(raw, ema or None, checkpoint meta)``: full fp32 tensors keyed like ``full_state_dict``."""
    step_dir = resolve_checkpoint_dir(path)
    meta, cfg, tp = _checkpoint_layout(step_dir)
    signature = meta[CHECKPOINT_MARKER]
    model = _reference_model(cfg, signature, with_attributes=tp > 1)
    params = dict(model.named_parameters())
    per_rank = [_tp_rank_fp32_state(step_dir, r) for r in range(tp)]
    missing = sorted(set(params) - set(per_rank[0]))
    if missing:
        raise CheckpointError(f"{step_dir} lacks {missing[:3]} for a '{signature['kind']}' model; "
                              "it was written by a different model")
    raw = {name: _join_tp_shards([state[name] for state in per_rank], param) for name, param in params.items()}
    ema = None
    ema_files = [step_dir / f"ema_tp{r:02d}.pt" for r in range(tp)]
    if all(f.is_file() for f in ema_files):
        shadows = [load_torch_file(f, what="checkpoint EMA shard", fix=INCOMPLETE, required=("shadow",))["shadow"]
                   for f in ema_files]
        trainable = [(n, p) for n, p in params.items() if p.requires_grad]
        if any(len(s) != len(trainable) for s in shadows):
            raise CheckpointError(f"EMA files in {step_dir} do not match the model's {len(trainable)} parameters")
        ema = {name: _join_tp_shards([s[i].float() for s in shadows], param)
               for i, (name, param) in enumerate(trainable)}
    for name, tensor in raw.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"consolidated '{name}' has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(params[name].shape)}; the checkpoint does not match its config")
    return raw, ema, meta


def _tokenizer_info(cfg: RunConfig) -> dict:
    try:
        return load_manifest(cfg.data.dir)["tokenizer"]
    except Exception as exc:  # DataError/ConfigError: the data folder moved or is gone
        raise CheckpointError(f"the checkpoint's data folder '{cfg.data.dir}' is unavailable ({exc}); it holds the "
                              "tokenizer description: restore it or convert on the machine that trained") from None


def checkpoint_to_weights(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` (model.safetensors, ema.safetensors, meta.json) from a DeepSpeed checkpoint."""
    raw, ema, meta = consolidate_checkpoint(path)
    cfg = config_from_dict(meta["config"])
    signature = meta[CHECKPOINT_MARKER]
    info = weights_meta(cfg, kind=signature["kind"], vocab_size=int(signature["vocab_size"]),
                        step=int(meta["step"]), tokenizer=_tokenizer_info(cfg),
                        extra={"data_dir": str(cfg.data.dir), "converted_from": str(resolve_checkpoint_dir(path))})
    return write_weights_folder(Path(out_dir), raw, ema, info)
