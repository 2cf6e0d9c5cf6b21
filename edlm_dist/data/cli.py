"""``edlm prepare-data --source ... --out DIR``: flags win over the optional config's data section."""

from __future__ import annotations

import argparse

from edlm_dist.config.load import load_config, validate_config
from edlm_dist.data.prepare import prepare_data
from edlm_dist.storage.outputs import claim_output

# Flags that set a data.* key: checked with the config's ranges and choices like any other value.
FLAG_KEYS = {"source": "source", "input": "input", "seq_len": "seq_len", "tokenizer": "tokenizer",
             "tokenizer_vocab": "tokenizer_vocab", "max_unk_rate": "max_unk_rate", "shard_rows": "shard_rows",
             "seed": "seed"}


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides or [])
    if args.source == "synthetic" and args.tokenizer is None:
        args.tokenizer = "synthetic"
    for flag, key in FLAG_KEYS.items():
        if getattr(args, flag) is not None:
            setattr(cfg.data, key, getattr(args, flag))
    validate_config(cfg)
    data = cfg.data
    with claim_output(args.out):
        manifest = prepare_data(
            data.source, args.out, seq_len=data.seq_len, tokenizer_spec=data.tokenizer,
            wrap=False if args.no_wrap else None, shard_rows=data.shard_rows, seed=data.seed,
            input_path=data.input or None, valid_docs=args.valid_docs, synthetic_cfg=data.synthetic,
            text_field=args.text_field, hf_name=args.hf_name, hf_split=args.hf_split,
            tokenizer_vocab=data.tokenizer_vocab, max_unk_rate=data.max_unk_rate, overwrite=args.overwrite,
            progress=cfg.logging.progress)
    rows = {split: sum(s["rows"] for s in info["shards"]) for split, info in manifest["splits"].items()}
    print(f"prepared {args.source} data in {args.out}: " + ", ".join(f"{k} {v} rows" for k, v in rows.items())
          + f"; tokenizer {manifest['tokenizer_spec']} (vocabulary {manifest['vocab_size']})")
    for split, count in manifest.get("unknown_tokens", {}).items():
        print(f"unknown tokens ([UNK]) in {split}: {count['rate']:.3%} ({count['unknown']} of {count['tokens']})")
    return 0
