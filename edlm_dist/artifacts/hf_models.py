"""Hugging Face ``transformers`` classes for exported edlm-dist models (``edlm export-hf``).

* **AR** -> :class:`EdlmARForCausalLM`, a GPT-NeoX causal LM. Our AR transformer *is* GPT-NeoX with
  sequential residuals (``use_parallel_residual=False``), full rotary (rotate-half, base 10000),
  tanh-GELU MLP with biases, attention without biases and LayerNorms whose bias is zero, except
  for one thing: its output projection has a bias, and ``GPTNeoXForCausalLM.lm_head`` has none
  (no standard HF causal LM with sequential pre-LN blocks, rotary and a non-gated MLP has an
  output bias). So the class is ``GPTNeoXForCausalLM`` with a biased ``lm_head`` and its own
  ``model_type`` ``edlm_ar``, registered with ``AutoConfig``/``AutoModelForCausalLM`` when this
  module is imported (no ``trust_remote_code``). The mask token is never predicted (as in
  :meth:`ARTransformer.log_probs`): its ``lm_head`` row is zero and its bias -1e6, so the exported
  logits equal ``suppress_mask_logit(edlm_logits)`` and the model works as a Gen-PPL oracle
  (``edlm_dist.evaluation.genppl.HFCausalLMOracle``) and with ``generate``.
* **Diffusion (DiT)** -> :class:`EdlmDiffusionModel` (``edlm_dit``) and **energy** ->
  :class:`EdlmEnergyModel` (``edlm_energy``): thin ``PreTrainedModel`` wrappers around the edlm
  modules themselves (dense, single device), so their outputs are the training code's outputs.

Usage: ``import edlm_dist.artifacts.hf_models`` once, then ``AutoModelForCausalLM.from_pretrained(dir)``
(AR) or ``AutoModel.from_pretrained(dir)`` (DiT / energy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import MaskedLMOutput, ModelOutput

from edlm_dist.config.schema import ModelConfig
from edlm_dist.models.build import build_model
from edlm_dist.objectives.subs import NEG_INF, subs_log_probs


AR_MODEL_TYPE, DIT_MODEL_TYPE, ENERGY_MODEL_TYPE = "edlm_ar", "edlm_dit", "edlm_energy"
HF_CLASS_FOR_KIND = {"ar": "EdlmARForCausalLM", "dit": "EdlmDiffusionModel", "energy": "EdlmEnergyModel"}


# ----------------------------------------------------------------------------- AR: GPT-NeoX + lm_head bias
@strict
class EdlmARConfig(GPTNeoXConfig):
    """GPT-NeoX config of an exported edlm AR model; ``mask_token_id`` is never predicted."""

    model_type = AR_MODEL_TYPE
    mask_token_id: Optional[int] = None


class EdlmARForCausalLM(GPTNeoXForCausalLM):
    """``GPTNeoXForCausalLM`` whose ``lm_head`` has a bias (the only difference to GPT-NeoX)."""

    config_class = EdlmARConfig
    _tied_weights_keys = {}  # the output projection is never tied to the embedding

    def __init__(self, config: EdlmARConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()


def ar_hf_config(model_cfg: ModelConfig, *, vocab_size: int, seq_len: int, mask_id: int, bos_id: Optional[int],
                 eos_id: Optional[int]) -> EdlmARConfig:
    """The GPT-NeoX hyper-parameters that reproduce :class:`edlm_dist.models.ar.ARTransformer` (spec §2.2)."""
    return EdlmARConfig(
        vocab_size=vocab_size, hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.n_blocks,
        num_attention_heads=model_cfg.n_heads, intermediate_size=model_cfg.mlp_ratio * model_cfg.hidden_size,
        hidden_act="gelu_pytorch_tanh",  # nn.GELU(approximate="tanh"), the op our MLP uses
        max_position_embeddings=seq_len,  # the trained context; Gen-PPL oracles chunk at this length
        layer_norm_eps=1e-5, use_parallel_residual=False, attention_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        mask_token_id=mask_id, architectures=["EdlmARForCausalLM"],
    )


def ar_state_dict_to_hf(state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                        mask_id: int) -> dict[str, torch.Tensor]:
    """Rename/reorder a full edlm AR state dict into :class:`EdlmARForCausalLM` tensors.

    Our fused qkv rows are ordered (three, heads, head_dim) (MDLM); GPT-NeoX's are (heads, three,
    head_dim). Missing LayerNorm biases are zeros. The mask row of the output layer becomes
    weight 0 / bias -1e6, i.e. exactly the logit ``suppress_mask_logit`` writes.
    """
    h, heads = model_cfg.hidden_size, model_cfg.n_heads
    out: dict[str, torch.Tensor] = {"gpt_neox.embed_in.weight": state["vocab_embed.weight"]}
    zeros = torch.zeros(h)
    for i in range(model_cfg.n_blocks):
        src, dst = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        qkv = state[src + "attn_qkv.weight"].view(3, heads, h // heads, h).transpose(0, 1).reshape(3 * h, h)
        out.update({
            dst + "input_layernorm.weight": state[src + "norm1.weight"], dst + "input_layernorm.bias": zeros,
            dst + "attention.query_key_value.weight": qkv,
            dst + "attention.dense.weight": state[src + "attn_out.weight"],
            dst + "post_attention_layernorm.weight": state[src + "norm2.weight"],
            dst + "post_attention_layernorm.bias": zeros,
            dst + "mlp.dense_h_to_4h.weight": state[src + "mlp.0.weight"],
            dst + "mlp.dense_h_to_4h.bias": state[src + "mlp.0.bias"],
            dst + "mlp.dense_4h_to_h.weight": state[src + "mlp.2.weight"],
            dst + "mlp.dense_4h_to_h.bias": state[src + "mlp.2.bias"],
        })
    weight = state["output_layer.linear.weight"].clone()
    bias = state["output_layer.linear.bias"].clone()
    weight[mask_id], bias[mask_id] = 0.0, NEG_INF
    out.update({"gpt_neox.final_layer_norm.weight": state["output_layer.norm_final.weight"],
                "gpt_neox.final_layer_norm.bias": zeros, "lm_head.weight": weight, "lm_head.bias": bias})
    return {k: v.contiguous().clone() for k, v in out.items()}


def ar_state_dict_from_hf(hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`ar_state_dict_to_hf`: edlm AR tensors from :class:`EdlmARForCausalLM` ones.

    The zero LayerNorm biases are dropped; the mask row keeps weight 0 / bias -1e6, which gives the same
    log-probabilities (``suppress_mask_logit`` overwrites that logit anyway)."""
    h, heads = model_cfg.hidden_size, model_cfg.n_heads
    out: dict[str, torch.Tensor] = {"vocab_embed.weight": hf_state["gpt_neox.embed_in.weight"]}
    for i in range(model_cfg.n_blocks):
        src, dst = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        qkv = hf_state[src + "attention.query_key_value.weight"].view(heads, 3, h // heads, h).transpose(0, 1)
        out.update({
            dst + "norm1.weight": hf_state[src + "input_layernorm.weight"], dst + "attn_qkv.weight": qkv.reshape(3 * h, h),
            dst + "attn_out.weight": hf_state[src + "attention.dense.weight"],
            dst + "norm2.weight": hf_state[src + "post_attention_layernorm.weight"],
            dst + "mlp.0.weight": hf_state[src + "mlp.dense_h_to_4h.weight"],
            dst + "mlp.0.bias": hf_state[src + "mlp.dense_h_to_4h.bias"],
            dst + "mlp.2.weight": hf_state[src + "mlp.dense_4h_to_h.weight"],
            dst + "mlp.2.bias": hf_state[src + "mlp.dense_4h_to_h.bias"],
        })
    out.update({"output_layer.norm_final.weight": hf_state["gpt_neox.final_layer_norm.weight"],
                "output_layer.linear.weight": hf_state["lm_head.weight"],
                "output_layer.linear.bias": hf_state["lm_head.bias"]})
    return {k: v.contiguous().clone() for k, v in out.items()}


def edlm_module_from_export(folder: str, kind: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The edlm state dict of an ``edlm export-hf`` folder, loaded through ``from_pretrained`` (a real HF round
    trip: the tensors the HF classes hold are the ones sampling and evaluation then use)."""
    register_auto_classes()
    if kind == "ar":
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return ar_state_dict_from_hf(hf.state_dict(), model_cfg)
    return AutoModel.from_pretrained(folder, dtype=torch.float32).model.state_dict()


# ----------------------------------------------------------------------------- DiT / energy wrappers
@strict
class _EdlmWrappedConfig(PreTrainedConfig):
    """Shape of the wrapped edlm module: the ``model:`` config section plus vocabulary and length."""

    vocab_size: int = 35
    seq_len: int = 32
    hidden_size: int = 64
    n_blocks: int = 2
    n_heads: int = 4
    cond_dim: int = 32
    mlp_ratio: int = 4
    time_conditioning: bool = False
    block_size: int = 0  # a block-causal DiT's model.block_size (0 = the whole row: MDLM)
    mask_token_id: Optional[int] = None

    def edlm_model_config(self) -> ModelConfig:
        return ModelConfig(hidden_size=self.hidden_size, n_blocks=self.n_blocks, n_heads=self.n_heads,
                           cond_dim=self.cond_dim, mlp_ratio=self.mlp_ratio, dropout=0.0,
                           time_conditioning=self.time_conditioning, block_size=self.block_size, use_apex=False)


@strict
class EdlmDiffusionConfig(_EdlmWrappedConfig):
    model_type = DIT_MODEL_TYPE


@strict
class EdlmEnergyConfig(_EdlmWrappedConfig):
    model_type = ENERGY_MODEL_TYPE


def wrapped_hf_config(kind: str, model_cfg: ModelConfig, *, vocab_size: int, seq_len: int, mask_id: int,
                      bos_id: Optional[int], eos_id: Optional[int]) -> _EdlmWrappedConfig:
    config_class = EdlmDiffusionConfig if kind == "dit" else EdlmEnergyConfig
    fields = {k: v for k, v in asdict(model_cfg).items()
              if k in ("hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio", "time_conditioning", "block_size")}
    return config_class(vocab_size=vocab_size, seq_len=seq_len, mask_token_id=mask_id, bos_token_id=bos_id,
                        eos_token_id=eos_id, architectures=[HF_CLASS_FOR_KIND[kind]], **fields)


class _EdlmWrapper(PreTrainedModel):
    """Holds the edlm module as ``self.model``; weights are its state dict under ``model.``."""

    base_model_prefix = "model"
    _edlm_kind = ""

    def __init__(self, config: _EdlmWrappedConfig):
        super().__init__(config)
        self.model = build_model(self._edlm_kind, config.edlm_model_config(), config.vocab_size, config.seq_len)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep the edlm initialisation (from_pretrained overwrites every weight anyway)."""


class EdlmDiffusionModel(_EdlmWrapper):
    """MDLM denoiser: ``forward(input_ids, sigma=None)`` -> raw logits (B, L, V), as ``DiT.forward``.

    ``log_probs`` applies SUBS (mask never predicted, unmasked tokens carried over): log mu_theta.
    """

    config_class = EdlmDiffusionConfig
    _edlm_kind = "dit"

    def forward(self, input_ids: torch.LongTensor, sigma: Optional[torch.Tensor] = None, **_) -> MaskedLMOutput:
        return MaskedLMOutput(logits=self.model(input_ids, sigma, gather_logits=True))

    @torch.no_grad()
    def log_probs(self, input_ids: torch.LongTensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        return subs_log_probs(self.model(input_ids, sigma, gather_logits=True), input_ids, self.config.mask_token_id)


@dataclass
class EnergyOutput(ModelOutput):
    """``energies``: (B,) float32 energies E_phi(x_t, x0)."""

    energies: Optional[torch.FloatTensor] = None


class EdlmEnergyModel(_EdlmWrapper):
    """EDLM energy E_phi: ``forward(x_t, x0, sigma=None)`` -> ``energies`` (B,), low = data-like."""

    config_class = EdlmEnergyConfig
    _edlm_kind = "energy"

    def forward(self, x_t: torch.LongTensor, x0: torch.LongTensor, sigma: Optional[torch.Tensor] = None,
                **_) -> EnergyOutput:
        return EnergyOutput(energies=self.model(x_t, x0, sigma))


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel*`` know the edlm model types (idempotent)."""
    for model_type, config_class in ((AR_MODEL_TYPE, EdlmARConfig), (DIT_MODEL_TYPE, EdlmDiffusionConfig),
                                     (ENERGY_MODEL_TYPE, EdlmEnergyConfig)):
        AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(EdlmARConfig, EdlmARForCausalLM, exist_ok=True)
    AutoModel.register(EdlmDiffusionConfig, EdlmDiffusionModel, exist_ok=True)
    AutoModelForMaskedLM.register(EdlmDiffusionConfig, EdlmDiffusionModel, exist_ok=True)
    AutoModel.register(EdlmEnergyConfig, EdlmEnergyModel, exist_ok=True)


register_auto_classes()
