"""``edlm export-hf CHECKPOINT --out DIR``: a trained model as a Hugging Face folder."""

from __future__ import annotations

import argparse

from edlm_dist.artifacts.hf_export import export_hf, read_export_meta
from edlm_dist.storage.outputs import claim_output


def cli_main(args: argparse.Namespace) -> int:
    with claim_output(args.out):
        out = export_hf(args.checkpoint, args.out, use_ema=args.use_ema)
    meta = read_export_meta(out)
    loader = "AutoModelForCausalLM" if meta["kind"] == "ar" else "AutoModel"
    print(f"exported {meta['kind']} model (step {meta.get('step')}, {meta['exported_weights']}) to {out}; load it with "
          f"`import edlm_dist.artifacts.hf_models` then `{loader}.from_pretrained('{out}')`")
    return 0
