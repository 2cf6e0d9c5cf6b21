"""What the block-causal denoiser costs: its attention mask, its training step, its cached sampling calls.

    OMP_NUM_THREADS=2 python tools/bench_block_denoiser.py                  # all three parts, demo-sized model
    OMP_NUM_THREADS=2 python tools/bench_block_denoiser.py --parts train --lengths 32 128 --blocks 4 8
    python tools/bench_block_denoiser.py --flex                              # + FlexAttention (compiles: slow)

* ``attention``: one attention call on (B, heads, N, d): SDPA without a mask over L (MDLM), SDPA with the
  dense two-stream boolean mask over 2L (the block-causal training forward), SDPA without a mask over 2L (what
  a mask-free kernel would cost on the same tokens), and, with ``--flex``, FlexAttention with a BlockMask
  (torch.compile'd; its compile time is printed separately).
* ``train``: one optimizer-free training step (forward + backward of MDLMObjective.loss) of the demo-sized
  DiT, MDLM vs block sizes b.
* ``denoise``: one sampling call of B rows: the whole-row forward (L tokens per row, what a bidirectional
  denoiser pays per step) vs a block of b tokens against a cached prefix of L - b positions (models/kv_cache.py).

Every figure is the median [min-max] of ``--repeats`` timings of ``--inner`` calls each, after a warm-up.
Prints figures; tests never time things.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from edlm_dist.config.schema import ModelConfig, RunConfig
from edlm_dist.models.block_attention import two_stream_mask
from edlm_dist.models.build import build_model
from edlm_dist.training.objective_steps import MDLMObjective

VOCAB, MASK = 35, 34


def timed(fn, repeats: int, inner: int) -> str:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return f"{statistics.median(samples):.3f} [{min(samples):.3f}-{max(samples):.3f}]"


def model_cfg(args, block_size: int) -> ModelConfig:
    return ModelConfig(hidden_size=args.hidden, n_blocks=args.n_blocks, n_heads=args.heads, cond_dim=32,
                       block_size=block_size)


def attention_part(args) -> None:
    print(f"\n## attention, ms per call (B={args.batch}, heads={args.heads}, d={args.hidden // args.heads})")
    print("| L | SDPA, no mask, L | SDPA, two-stream mask, 2L | SDPA, no mask, 2L | block | FlexAttention, 2L |")
    print("|---|---|---|---|---|---|")
    d = args.hidden // args.heads
    for length in args.lengths:
        for block in args.blocks:
            q, k, v = (torch.randn(args.batch, args.heads, 2 * length, d) for _ in range(3))
            mask = two_stream_mask(length, block)
            plain = timed(lambda: F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length],
                                                                 v[:, :, :length]), args.repeats, args.inner)
            masked = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.repeats, args.inner)
            double = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats, args.inner)
            flex = flex_time(q, k, v, length, block, args) if args.flex else "not run (--flex)"
            print(f"| {length} | {plain} | {masked} | {double} | {block} | {flex} |")


def flex_time(q, k, v, length: int, block: int, args) -> str:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def allowed(b, h, qi, ki):
        q_clean, k_clean = qi >= length, ki >= length
        qb, kb = torch.where(q_clean, qi - length, qi) // block, torch.where(k_clean, ki - length, ki) // block
        return ((qb == kb) & (q_clean == k_clean)) | ((qb > kb) & k_clean & ~q_clean) | ((qb >= kb) & k_clean & q_clean)

    block_mask = create_block_mask(allowed, None, None, 2 * length, 2 * length, device=q.device)
    compiled = torch.compile(flex_attention)
    start = time.perf_counter()
    compiled(q, k, v, block_mask=block_mask)
    compile_s = time.perf_counter() - start
    return f"{timed(lambda: compiled(q, k, v, block_mask=block_mask), args.repeats, args.inner)} (compile {compile_s:.0f} s)"


def train_part(args) -> None:
    print(f"\n## training step (forward + backward), ms per step (B={args.batch}, H={args.hidden}, "
          f"{args.n_blocks} blocks)")
    print("| L | MDLM | " + " | ".join(f"block b={b}" for b in args.blocks) + " |")
    print("|---|---|" + "---|" * len(args.blocks))
    objective = MDLMObjective(RunConfig(), VOCAB, MASK, 1)
    for length in args.lengths:
        cells = []
        for block in [0, *args.blocks]:
            torch.manual_seed(0)
            model = build_model("dit", model_cfg(args, block), VOCAB, length)
            rows = torch.randint(0, MASK, (args.batch, length))
            generator = torch.Generator().manual_seed(1)

            def step():
                model.zero_grad(set_to_none=True)
                objective.loss(model, rows, generator)[0].backward()

            cells.append(timed(step, args.repeats, max(1, args.inner // 4)))
        print(f"| {length} | " + " | ".join(cells) + " |")


@torch.no_grad()
def denoise_part(args) -> None:
    print(f"\n## one sampling call of B={args.batch} rows, ms: whole row (L tokens) vs block b against a cached "
          "prefix of L - b positions")
    print("| L | whole row, L tokens | block | cached block, b tokens | ratio |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        for block in args.blocks:
            torch.manual_seed(0)
            model = build_model("dit", model_cfg(args, block), VOCAB, length).eval()
            rows = torch.randint(0, MASK, (args.batch, length))
            whole = timed(lambda: model(rows), args.repeats, args.inner)
            cache = model.new_cache()
            model(rows[:, : length - block], cache=cache)
            chunk = rows[:, length - block:]
            cached = timed(lambda: model(chunk, cache=cache, append=False), args.repeats, args.inner)
            ratio = float(whole.split()[0]) / float(cached.split()[0])
            print(f"| {length} | {whole} | {block} | {cached} | {ratio:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["attention", "train", "denoise"],
                        choices=["attention", "train", "denoise"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--n-blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention (torch.compile; minutes)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for part in args.parts:
        {"attention": attention_part, "train": train_part, "denoise": denoise_part}[part](args)


if __name__ == "__main__":
    main()
