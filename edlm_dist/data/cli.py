"""``edlm prepare-data --source ... --out DIR``: flags win over the optional config's data section."""

from __future__ import annotations

import argparse

from edlm_dist.config.load import load_config
from edlm_dist.data.prepare import prepare_data


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides or [])
    data = cfg.data
    manifest = prepare_data(
        args.source,
        args.out,
        seq_len=args.seq_len or data.seq_len,
        tokenizer_spec=args.tokenizer or ("synthetic" if args.source == "synthetic" else data.tokenizer),
        wrap=False if args.no_wrap else None,
        shard_rows=args.shard_rows or data.shard_rows,
        seed=data.seed if args.seed is None else args.seed,
        input_path=args.input,
        valid_docs=args.valid_docs,
        synthetic_cfg=data.synthetic,
        text_field=args.text_field,
        hf_name=args.hf_name,
        hf_split=args.hf_split,
        tokenizer_vocab=data.tokenizer_vocab if args.tokenizer_vocab is None else args.tokenizer_vocab,
        max_unk_rate=data.max_unk_rate if args.max_unk_rate is None else args.max_unk_rate,
        overwrite=args.overwrite,
        progress=cfg.logging.progress,
    )
    rows = {split: sum(s["rows"] for s in info["shards"]) for split, info in manifest["splits"].items()}
    print(f"prepared {args.source} data in {args.out}: " + ", ".join(f"{k} {v} rows" for k, v in rows.items())
          + f"; tokenizer {manifest['tokenizer_spec']} (vocabulary {manifest['vocab_size']})")
    for split, count in manifest.get("unknown_tokens", {}).items():
        print(f"unknown tokens ([UNK]) in {split}: {count['rate']:.3%} ({count['unknown']} of {count['tokens']})")
    return 0
