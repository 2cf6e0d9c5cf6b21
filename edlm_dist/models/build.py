"""Model construction from config, analytical parameter counts, FLOPs per token and memory estimates.

``count_parameters`` reproduces spec §2.3 / §6.2 exactly (small DiT 169,627,218; small AR
162,246,482; small energy 133,341,184 trainable). The counts are for the unpadded vocabulary and
do not depend on the TP degree.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import ConfigError
from edlm_dist.models.ar import ARTransformer
from edlm_dist.models.dit import DiT
from edlm_dist.models.energy import EnergyModel
from edlm_dist.parallel.sharded_state import padded_vocab_size

MODEL_KINDS = {"dit": DiT, "ar": ARTransformer, "energy": EnergyModel}
FREQUENCY_FEATURES = 256  # sinusoidal features of the sigma embedding


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model kind '{kind}' is unknown; use one of {sorted(MODEL_KINDS)}")


def build_model(kind: str, model_cfg: ModelConfig, vocab_size: int, length: int, *,
                device: Optional[torch.device | str] = None, meta: bool = False) -> nn.Module:
    """Construct ``kind`` for the current TP group (or dense when none); the caller seeds the RNG.

    ``meta=True`` allocates nothing (shapes only): for counting and memory planning.
    """
    _check_kind(kind)
    if vocab_size < 2 or length < 1:
        raise ConfigError(f"vocab_size={vocab_size} and length={length} must be >= 2 and >= 1; check data.vocab_size")
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        model = MODEL_KINDS[kind](model_cfg, vocab_size, length, init=not meta)
    if device is not None and not meta:
        model = model.to(device)  # Module._apply keeps the Parameter objects and their TP attributes
    return model


def parameter_split(model_cfg: ModelConfig, vocab_size: int, kind: str) -> dict[str, int]:
    """Full-model parameter counts split into TP-sharded, replicated and per-sequence ones.

    ``per_sequence`` counts the replicated parameters that act once per sequence rather than per
    token (sigma-MLP, adaLN, energy head); they are left out of the FLOP count.
    """
    _check_kind(kind)
    h, c, r, n, v = model_cfg.hidden_size, model_cfg.cond_dim, model_cfg.mlp_ratio, model_cfg.n_blocks, vocab_size
    sigma_mlp = FREQUENCY_FEATURES * c + c + c * c + c
    block_sharded = 3 * h * h + h * h + (r * h * h + r * h) + r * h * h  # qkv, attn_out, mlp_in(+bias), mlp_out
    block_replicated = h + 2 * h  # mlp_out bias, two LayerNorm weights
    ada_block, ada_final = c * 6 * h + 6 * h, c * 2 * h + 2 * h
    sharded = v * h + n * block_sharded  # input embedding + blocks
    replicated = n * block_replicated
    per_sequence = 0
    if kind in ("dit", "energy"):
        per_sequence += sigma_mlp + n * ada_block + ada_final
    if kind in ("dit", "ar"):
        sharded += h * v + v  # output projection over the vocabulary
        replicated += h  # final LayerNorm
    if kind == "energy":
        replicated += (2 * h * h + h) + (h + h * h + h)  # vocab_proj; final LN + Linear(H→H)
        per_sequence += (h * h + h) + h  # head Linear(H→H) -> ReLU -> Linear(H→1, no bias)
    return {"sharded": sharded, "replicated": replicated, "per_sequence": per_sequence,
            "embedding": v * h}


def count_parameters(model_cfg: ModelConfig, vocab_size: int, kind: str) -> int:
    """Analytical full-model (trainable) parameter count; equals the numel of a TP=1 model."""
    split = parameter_split(model_cfg, vocab_size, kind)
    return split["sharded"] + split["replicated"] + split["per_sequence"]


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, length: int, kind: str) -> float:
    """Training FLOPs per token, fwd+bwd: 6·N_token + 12·n_blocks·H·L (PaLM / nanoGPT convention).

    N_token excludes the embedding lookup and the per-sequence parameters (sigma-MLP, adaLN,
    energy head). The attention term counts QKᵀ and AV for the full L×L matrix; causal attention
    is not halved (the usual MFU convention).

    A block-causal DiT (``model.block_size`` < L) trains on [x_t ; x0]: every data token is two
    tokens through the blocks, attending over 2L keys (the dense masked SDPA computes them all), while
    the output projection runs on x_t only.
    """
    split = parameter_split(model_cfg, vocab_size, kind)
    n_token = split["sharded"] + split["replicated"] - split["embedding"]
    streams = 2 if kind == "dit" and model_cfg.block_size not in (0, length) else 1
    h = model_cfg.hidden_size
    output = h * vocab_size + vocab_size + h if kind in ("dit", "ar") else 0  # final LN + projection: x_t only
    trunk = n_token - output
    return 6.0 * (streams * trunk + output) + 12.0 * model_cfg.n_blocks * model_cfg.hidden_size * length * streams**2


def nce_flops_per_token(model_cfg: ModelConfig, vocab_size: int, length: int, n_negatives: int) -> float:
    """NCE training FLOPs per data token (eq. 10): the energy net's forward + backward on the data row and
    its ``n_negatives`` negatives, plus the frozen diffusion model's forward that proposes them (a
    forward is a third of :func:`flops_per_token`'s forward + backward count)."""
    energy = flops_per_token(model_cfg, vocab_size, length, "energy")
    return (1 + n_negatives) * energy + flops_per_token(model_cfg, vocab_size, length, "dit") / 3


def _resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision '{precision}' is not supported; use fp32, bf16 or auto")
    return precision


# Saved activations of one DDiT block, bytes per token per hidden unit, measured with
# torch.autograd.graph.saved_tensors_hooks (tests/models/test_memory_estimate.py re-measures them):
# (replicated over TP, split over TP). bf16 = bf16 weights under bf16 autocast, as training runs.
# Replicated: each LayerNorm keeps its fp32 input, normalised output and weighted output (autocast
# off, spec §2.1) plus the modulated input of the next matmul; the MLP output is kept for the gate.
# Split: the whole fused qkv (a view keeps it alive), rotated q and k, the attention output and its
# projection input, the MLP hidden before and after GELU. Flash/SDPA keeps no L×L scores.
BLOCK_SAVED_BYTES = {"bf16": (30, 30), "fp32": (36, 60)}
HEAD_SAVED_BYTES = {"bf16": 14, "fp32": 16}  # final LayerNorm (fp32 x, y, y·w) + modulated input


def activation_bytes(model_cfg: ModelConfig, vocab_size: int, length: int, micro_batch: int, tp: int,
                     precision: str, *, kind: str = "dit") -> dict[str, int]:
    """Activation bytes per GPU for one micro-batch of ``micro_batch`` rows of ``length`` tokens.

    ``saved`` is what autograd keeps between forward and backward (what saved-tensor hooks see):
    blocks + final layer + the fp32 log-probabilities the cross entropy saves. ``logits_transient``
    is the rest of the logits' peak: the model's logits in the weight dtype, the fp32 upcast (bf16)
    and the fp32 gradient of the log-probabilities in backward.
    """
    precision = _resolve_precision(precision)
    weight_bytes, tokens = (2 if precision == "bf16" else 4), micro_batch * length
    h, v_local = model_cfg.hidden_size, padded_vocab_size(vocab_size, tp) // tp
    replicated, split = BLOCK_SAVED_BYTES[precision]
    per_block = replicated + split / tp + (weight_bytes if model_cfg.dropout > 0 else 0) * 2  # 2 dropout masks: weight dtype on CPU, bool on CUDA (an upper bound)
    attention_stats = 4 * model_cfg.n_heads / tp / h  # fp32 log-sum-exp per head and token
    streams = 2 if kind == "dit" and model_cfg.block_size not in (0, length) else 1
    block_tokens = streams * tokens  # block-causal DiT: the blocks run on [x_t ; x0]
    if model_cfg.activation_checkpointing:  # block inputs only, plus one block's working set in backward
        blocks = block_tokens * h * (model_cfg.n_blocks * weight_bytes + per_block + attention_stats)
    else:
        blocks = model_cfg.n_blocks * block_tokens * h * (per_block + attention_stats)
    saved = blocks + tokens * h * HEAD_SAVED_BYTES[precision]
    transient = 0
    if kind == "energy":
        saved *= 2  # a positive and a negative pass per row
    else:
        saved += tokens * v_local * 4  # fp32 log-probabilities kept by the cross entropy
        transient = tokens * v_local * (weight_bytes + (4 if precision == "bf16" else 0) + 4)
    return {"saved": int(saved), "logits_transient": int(transient)}


def estimate_memory(model_cfg: ModelConfig, vocab_size: int, length: int, micro_batch: int, zero_stage: int,
                    dp: int, tp: int, precision: str, *, kind: str = "dit", ema: bool = True) -> dict[str, int]:
    """Per-GPU bytes: params, grads, Adam states (by ZeRO stage), EMA shadow, activations (+ frozen p_θ for NCE).

    bf16 follows the engine (parallel/deepspeed_engine.py): 2-byte params and grads plus an fp32
    gradient-accumulation buffer (split over dp from ZeRO-2), fp32 master + m + v (12 B/param),
    and bf16 at ZeRO-0 runs as ZeRO-1. fp32: 4-byte params and grads, m + v (8 B/param). ZeRO-1
    splits the optimizer states over dp, ZeRO-2 also the grads, ZeRO-3 also the params. The EMA
    shadow is fp32 and whole on every data-parallel rank. Activations: :func:`activation_bytes`.
    """
    if zero_stage not in (0, 1, 2, 3) or dp < 1 or tp < 1:
        raise ConfigError(f"zero_stage={zero_stage}, dp={dp}, tp={tp}: need stage 0..3 and dp, tp >= 1")
    precision = _resolve_precision(precision)
    if precision == "bf16":
        zero_stage = max(zero_stage, 1)
    split = parameter_split(model_cfg, vocab_size, kind)
    h, v_pad = model_cfg.hidden_size, padded_vocab_size(vocab_size, tp)
    sharded = split["sharded"] + (v_pad - vocab_size) * h * (2 if kind != "energy" else 1)
    local = sharded // tp + split["replicated"] + split["per_sequence"]
    weight_bytes = 2 if precision == "bf16" else 4
    params = local * weight_bytes
    grads = local * weight_bytes
    accumulation = local * 4 if precision == "bf16" else 0
    optimizer = local * (12 if precision == "bf16" else 8)
    if zero_stage >= 1:
        optimizer //= dp
    if zero_stage >= 2:
        grads //= dp
        accumulation //= dp
    if zero_stage >= 3:
        params //= dp
    acts = activation_bytes(model_cfg, vocab_size, length, micro_batch, tp, precision, kind=kind)
    out = {"params": int(params), "grads": int(grads), "grad_accumulation": int(accumulation),
           "optimizer": int(optimizer), "ema": int(local * 4) if ema else 0,
           "activations": acts["saved"] + acts["logits_transient"]}
    if kind == "energy":  # the frozen diffusion model p_θ lives next to the energy net
        dit = parameter_split(model_cfg, vocab_size, "dit")
        out["frozen_diffusion"] = int((dit["sharded"] // tp + dit["replicated"] + dit["per_sequence"]) * weight_bytes)
    out["total"] = sum(out.values())
    return out
