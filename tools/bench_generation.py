"""Generation benchmarks: the AR sampler's KV cache vs the reference's full recomputation (spec §5.7), and
rows longer than the context on the trained demo models (spec §5.6).

    OMP_NUM_THREADS=1 python3 -m tools.bench_generation                       # random AR models, L = 32 128 512
    python3 -m tools.bench_generation --hidden 64 --blocks 2 --lengths 32 --batches 1 32 --repeats 5
    OMP_NUM_THREADS=1 python3 -m tools.bench_generation --demo runs/demo --long 32 96 --samples 64

``--demo``: MDLM and EDLM-AR (T steps per window, k proposals) and the AR sampler write rows of each
``--long`` length N (N > L: semi-AR windows of ``--stride`` new tokens); exact Gen PPL of the whole rows
(the language at length N) and seconds per sample, with 95 % bootstrap intervals (evaluation/intervals.py).

For each row length L and batch size: seconds per sample of ``sample_ar_batch`` with and without the
KV cache (median [95 % bootstrap interval] over repeats), the speed-up, the tokens pushed through the model per row
(cached: L; uncached: the whole prefix at every step, L(L-1)/2) and the worst relative difference of
the cached logits from one full forward (float32). Both modes make L-1 sequential model calls per row.
The samples are the same in both modes (tested in tests/sampling/test_ar_sampler.py). Prints Markdown
(tests never time things).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from edlm_dist.evaluation.intervals import bootstrap_rows, bootstrap_samples, median
from edlm_dist.sampling.long_text import window_plan


def _random_ar(hidden: int, blocks: int, heads: int, vocab: int, length: int, seed: int = 0):
    import math

    from edlm_dist.config.schema import ModelConfig
    from edlm_dist.models.build import build_model

    torch.manual_seed(seed)
    model = build_model("ar", ModelConfig(hidden_size=hidden, n_blocks=blocks, n_heads=heads, cond_dim=8), vocab,
                        length).eval()
    with torch.no_grad():  # the output layer starts at zero: give every logit a spread
        model.output_layer.linear.weight.normal_(0.0, 1.0 / math.sqrt(hidden))
    return model


@torch.no_grad()
def cached_logit_error(model, length: int, vocab: int) -> float:
    rows = torch.randint(0, vocab - 1, (2, length), generator=torch.Generator().manual_seed(1))
    full = model(rows, gather_logits=True)
    cache = model.new_cache(length)
    cached = torch.cat([model(rows[:, i : i + 1], gather_logits=True, cache=cache) for i in range(length)], dim=1)
    return float((cached - full).abs().max() / full.abs().max())


def _seconds_per_sample(model, length: int, batch: int, vocab: int, kv_cache: bool, repeats: int) -> list[float]:
    from edlm_dist.sampling.ar_sampler import sample_ar_batch
    from edlm_dist.sampling.settings import SamplerSettings

    settings = SamplerSettings(sampler="ar", kv_cache=kv_cache, seed=3)
    out = []
    for _ in range(repeats):
        tick = time.perf_counter()
        sample_ar_batch(model, settings, range(batch), length=length, mask_id=vocab - 1, bos_id=vocab - 3)
        out.append((time.perf_counter() - tick) / batch)
    return out


def _interval(values: list[float]) -> str:
    """Median ms and its 95 % percentile-bootstrap interval over the repeats (evaluation/intervals.py)."""
    return bootstrap_rows([v * 1e3 for v in values], median).format("{:.1f}")


def long_rows(demo: str, lengths: list[int], samples: int, steps: int, k: int, stride: int, batch: int) -> None:
    from edlm_dist.evaluation.intervals import RatioStatistic, bootstrap_interval
    from edlm_dist.evaluation.sample_metrics import ExactSyntheticOracle
    from edlm_dist.artifacts.weights import load_trained_model
    from edlm_dist.pipeline.run import load_pipeline_models
    from edlm_dist.sampling.generate import Generator
    from edlm_dist.sampling.settings import SamplerSettings

    denoiser, energies, language, meta = load_pipeline_models(demo)
    ar = load_trained_model(f"{demo}/ar", expect_kind="ar")[0]
    oracle, context, mask = ExactSyntheticOracle(language), int(meta["seq_len"]), int(meta["mask_id"])
    methods = {"mdlm": SamplerSettings(sampler="mdlm", steps=steps), "ar": SamplerSettings(sampler="ar"),
               "edlm-ar": SamplerSettings(sampler="edlm", steps=steps, k=k, window=1.0)}
    print(f"demo models {demo}, L={context}, stride {stride}, T={steps} per window, EDLM k={k}, {samples} samples, "
          f"batch {batch}; Gen PPL exact over whole rows, 95 % bootstrap intervals\n")
    print("| method | N | windows | Gen PPL | NLL/token | seconds/sample | language entropy rate (PPL) |")
    print("|---|---|---|---|---|---|---|")
    for length in lengths:
        rate = math.exp(oracle.language_at(length).entropy_per_token()[0])
        for name, settings in methods.items():
            generator = Generator(settings, context, mask, language.bos_id, language.eos_id, torch.device("cpu"),
                                  denoiser=denoiser, energy_fn=energies["ar"], ar_model=ar)
            rows, seconds = [], []
            for start in range(0, samples, batch):
                ids = list(range(start, min(samples, start + batch)))
                tick = time.perf_counter()
                out = generator.generate(ids, torch.full((len(ids), length), mask), stride=stride)
                seconds += [(time.perf_counter() - tick) / len(ids)] * len(ids)
                rows += out.tokens.tolist()
            nll, tokens = oracle.score_rows([{"tokens": row} for row in rows])
            ppl = bootstrap_interval(RatioStatistic.gen_ppl(nll, tokens))
            secs = bootstrap_interval(RatioStatistic.mean(torch.tensor(seconds), groups=torch.arange(samples) // batch))
            windows = len(window_plan(length, context, stride, causal=name == "ar"))
            print(f"| {name} | {length} | {windows} | {ppl.format()} | {float(nll.sum() / tokens.sum()):.3f} | "
                  f"{secs.format('{:.4f}')} | {rate:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=35)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", default=None, help="a finished `edlm pipeline` folder: long-row mode")
    parser.add_argument("--long", type=int, nargs="+", default=[32, 96], help="row lengths N for --demo")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    if args.demo:
        long_rows(args.demo, args.long, args.samples, args.steps, args.k, args.stride, args.batch)
        return
    print(f"AR model H={args.hidden}, {args.blocks} blocks, {args.heads} heads, V={args.vocab}; "
          f"threads={torch.get_num_threads()}; ms per sample, median [95 % bootstrap interval] of {args.repeats}\n")
    print("| L | batch | cached ms/sample | uncached ms/sample | speed-up | model tokens/row cached : uncached | "
          "max rel. logit diff |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        model = _random_ar(args.hidden, args.blocks, args.heads, args.vocab, length)
        error = cached_logit_error(model, length, args.vocab)
        for batch in args.batches:
            cached = _seconds_per_sample(model, length, batch, args.vocab, True, args.repeats)
            full = _seconds_per_sample(model, length, batch, args.vocab, False, args.repeats)
            speedup = bootstrap_samples([full, cached], lambda a, b: median(a) / median(b)).format("{:.2f}")
            print(f"| {length} | {batch} | {_interval(cached)} | {_interval(full)} | {speedup}x | "
                  f"{length} : {length * (length - 1) // 2} | {error:.1e} |")


if __name__ == "__main__":
    main()
