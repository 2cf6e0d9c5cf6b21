"""``edlm export-hf CKPT --out DIR``: a trained model as a Hugging Face folder.

``CKPT`` is a run folder (``OUT``: its ``OUT/weights``, else its latest checkpoint), a weights
folder, or a DeepSpeed checkpoint folder (``OUT/checkpoints/step_X``, consolidated on the fly by
:mod:`edlm_dist.artifacts.zero_to_fp32`). ``DIR`` receives

* ``model.safetensors`` + ``config.json``: :mod:`edlm_dist.artifacts.hf_models` classes. The AR model
  is a GPT-NeoX causal LM (``AutoModelForCausalLM``), the diffusion and energy models load with
  ``AutoModel`` — after ``import edlm_dist.artifacts.hf_models``, which registers the model types;
* tokenizer files that ``AutoTokenizer.from_pretrained(DIR)`` reads: GPT-2 -> ``GPT2TokenizerFast``
  (exactly GPT-2's; the mask id 50257 is only in ``config.json`` as ``mask_token_id``);
  synthetic / text8 -> a ``tokenizers`` WordLevel model in a ``PreTrainedTokenizerFast`` (same ids,
  special strings and decoding as edlm's own tokenizers);
* ``edlm_meta.json``: the weights' meta (kind, step, full training config, tokenizer).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models as token_models
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from edlm_dist.artifacts import hf_models
from edlm_dist.artifacts.readers import check_tensors_finite, load_safetensors, read_meta_json
from edlm_dist.artifacts.weights import HF_EXPORT_META, REEXPORT, read_weights_meta, tokenizer_for, weights_file
from edlm_dist.artifacts.zero_to_fp32 import checkpoint_to_weights
from edlm_dist.config.load import config_from_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.learned_tokenizers import SPECIALS, LearnedTokenizer
from edlm_dist.data.tokenizers import TEXT8_SPECIALS
from edlm_dist.errors import CheckpointError, DataError
from edlm_dist.storage.files import output_error, remove_quietly, swap_in_entries, write_json_atomic
from edlm_dist.storage.outputs import LOCK_FILE

META_FILE = HF_EXPORT_META


# ----------------------------------------------------------------------------- weights
def load_export_source(path: str | os.PathLike, *, use_ema: bool,
                       scratch: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, RunConfig, str]:
    """``(full edlm state dict, weights meta, config, which file)`` from a run, weights or checkpoint folder."""
    try:
        folder, meta = read_weights_meta(path)
    except CheckpointError:
        folder = checkpoint_to_weights(path, Path(scratch) / "weights")  # raises if it is no checkpoint either
        folder, meta = read_weights_meta(folder)
    name = weights_file(folder, use_ema)
    state = load_safetensors(folder / name, what="weights file", fix=REEXPORT)
    check_tensors_finite(state, folder / name, what="the weights", fix=REEXPORT)
    return state, meta, config_from_dict(meta["config"]), name


# ----------------------------------------------------------------------------- tokenizer
def _word_level(tok, specials: list[str], *, char_level: bool, unk: str | None):
    """A ``tokenizers`` WordLevel model whose ids are edlm's: token i is ``tok.decode([i])``."""
    vocab = {tok.decode([i]): i for i in range(tok.vocab_size)}
    backend = BackendTokenizer(token_models.WordLevel(vocab, unk_token=unk))
    if char_level:  # text8: lower-case, one token per character (newlines too, as [UNK]), decode by joining
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:  # whitespace-separated words, decoded joined by single spaces
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return backend


def hf_tokenizer(tok, *, model_max_length: int):
    """A ``transformers`` fast tokenizer with the same ids as the edlm tokenizer ``tok``."""
    if isinstance(tok, LearnedTokenizer):  # char / byte: the backend itself, specials appended at ids n, n+1, n+2
        backend = BackendTokenizer.from_str(tok.backend.to_str())
        backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
        named = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "mask_token": SPECIALS[2]}
        if tok.unk_id is not None:
            named["unk_token"] = tok.token(tok.unk_id)
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **named)
        if (hf.bos_token_id, hf.mask_token_id) != (tok.bos_id, tok.mask_id):
            raise DataError(f"exported tokenizer puts the mask at {hf.mask_token_id}, the model at {tok.mask_id}")
    elif tok.name == "gpt2":
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(tmp)
            hf = GPT2TokenizerFast.from_pretrained(tmp)
        # The mask id (50257, one past the BPE) stays out of the tokenizer: an added "[MASK]" token would
        # turn the literal text "[MASK]" into the mask id, which edlm's encode (and GPT-2) never does.
    elif tok.name in ("synthetic", "text8"):
        char = tok.name == "text8"
        specials = list(TEXT8_SPECIALS) if char else [tok.decode([i]) for i in (tok.bos_id, tok.eos_id, tok.mask_id)]
        named = {"bos_token": tok.decode([tok.bos_id]), "eos_token": tok.decode([tok.eos_id]),
                 "mask_token": tok.decode([tok.mask_id])}
        if char:
            named.update(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
        backend = _word_level(tok, specials, char_level=char, unk="[UNK]" if char else None)
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **named)
        if hf.mask_token_id != tok.mask_id:
            raise DataError(f"exported tokenizer puts the mask at {hf.mask_token_id}, the model at {tok.mask_id}")
    else:
        raise DataError(f"tokenizer '{tok.name}' has no Hugging Face export; use char, byte, gpt2, text8 or synthetic")
    hf.model_max_length = model_max_length
    return hf


# ----------------------------------------------------------------------------- export
def _hf_state_and_config(kind: str, state: dict[str, torch.Tensor], meta: dict, cfg: RunConfig, tok):
    shape = dict(vocab_size=int(meta["vocab_size"]), seq_len=int(meta["seq_len"]), mask_id=int(meta["mask_id"]),
                 bos_id=tok.bos_id, eos_id=tok.eos_id)
    if kind == "ar":
        hf_state = hf_models.ar_state_dict_to_hf(state, cfg.model, shape["mask_id"])
        return hf_state, hf_models.ar_hf_config(cfg.model, **shape)
    if kind in ("dit", "energy"):
        return ({"model." + k: v.contiguous() for k, v in state.items()},
                hf_models.wrapped_hf_config(kind, cfg.model, **shape))
    raise CheckpointError(f"model kind '{kind}' cannot be exported; expected dit, ar or energy")


def _check_target(out: Path) -> None:
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if entries and not (out / META_FILE).is_file():
        raise CheckpointError(f"--out {out} exists and is not an edlm export; choose an empty or new folder")


def export_hf(path: str | os.PathLike, out: str | os.PathLike, *, use_ema: bool = True) -> Path:
    """Write the Hugging Face folder ``out`` for the model at ``path``; returns ``out``."""
    out = Path(out)
    _check_target(out)
    tmp = out / ".building"  # inside --out (which holds the lock); swapped in once complete
    remove_quietly(tmp)
    tmp.mkdir(parents=True)
    try:
        state, meta, cfg, source = load_export_source(path, use_ema=use_ema, scratch=tmp / ".scratch")
        tok = tokenizer_for(meta)
        hf_state, hf_config = _hf_state_and_config(meta["kind"], state, meta, cfg, tok)
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config.save_pretrained(str(tmp))
        hf_tokenizer(tok, model_max_length=int(meta["seq_len"])).save_pretrained(str(tmp))
        remove_quietly(tmp / ".scratch")
        write_json_atomic(tmp / META_FILE, {**meta, "exported_weights": source})
    except OSError as exc:
        remove_quietly(tmp)
        raise output_error(out, exc) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    names = sorted(p.name for p in tmp.iterdir() if p.name != META_FILE)
    swap_in_entries(tmp, out, names, marker=META_FILE)
    for stale in out.iterdir():  # files of an earlier export that this one does not have
        if stale.name not in names + [META_FILE, LOCK_FILE]:
            remove_quietly(stale)
    return out


def read_export_meta(out: str | os.PathLike) -> dict:
    """The ``edlm_meta.json`` of an export folder: the weights' meta plus which file was exported."""
    return read_meta_json(Path(out) / META_FILE, what="export metadata", fix="export the run again",
                          required=("kind",))
