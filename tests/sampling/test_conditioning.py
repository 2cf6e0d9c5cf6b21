"""Prompts, infilling templates and long rows: parsing round trips, the window plan, fixed tokens kept.

Truth: the tokenizers' own encode/decode (a template's literal pieces must decode back to the text),
coverage arithmetic for the windows, and a recording stub sampler for the long-row driver.
"""

from __future__ import annotations

import json

import pytest
import torch

from edlm_dist.errors import ConfigError
from edlm_dist.data.learned_tokenizers import learn_tokenizer
from edlm_dist.data.tokenizers import GPT2BPETokenizer, SyntheticTokenizer, Text8Tokenizer, gpt2_files_from_package
from edlm_dist.sampling.conditioning import (
    marked_text, parse_prompt, read_prompts_file, spans, start_rows,
)
from edlm_dist.sampling.engine import SampleBatch
from edlm_dist.sampling.long_text import WINDOW_ID_STRIDE, generate_long, window_plan

SYN = SyntheticTokenizer(32)  # BOS 32, EOS 33, MASK 34


def test_text_prompts_and_templates_become_fixed_tokens():
    prompt = parse_prompt("w3 w30", SYN)
    assert prompt.tokens == (32, 3, 30) and prompt.kind == "prompt"
    infill = parse_prompt("w1 [MASK:2] w5 [MASK] w7", SYN)
    assert infill.tokens == (32, 1, None, None, 5, None, 7) and infill.kind == "infill"
    assert parse_prompt("[BOS] w2", SYN).tokens == (32, 2)  # BOS is not doubled
    for spec in ("5 12 _ _ 7", "5 12 [MASK:2] 7", [5, 12, None, None, 7]):
        assert parse_prompt(spec, SYN, ids=True).tokens == (32, 5, 12, None, None, 7)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        parse_prompt("5 99", SYN, ids=True)
    with pytest.raises(ConfigError, match="not an id"):
        parse_prompt("5 x", SYN, ids=True)
    with pytest.raises(ConfigError, match="mask token as a fixed token"):
        parse_prompt([5, 34], SYN)
    with pytest.raises(ConfigError, match=r"n >= 1"):
        parse_prompt("w1 [MASK:0]", SYN)


def test_gpt2_and_char_templates_decode_back_to_their_text(tmp_path):
    gpt2 = GPT2BPETokenizer(gpt2_files_from_package(tmp_path / "gpt2"))
    template = parse_prompt("The [MASK:12] of the [MASK:5]", gpt2)
    tokens = template.tokens
    assert tokens[0] == gpt2.bos_id and tokens.count(None) == 17
    first_gap = tokens.index(None)
    assert gpt2.decode(tokens[1:first_gap]) == "The"  # the span after it starts with its own space
    middle = tokens[first_gap + 12 : tokens.index(None, first_gap + 12)]
    assert gpt2.decode(middle) == " of the"
    for chars in (Text8Tokenizer(), learn_tokenizer("char", ["the cat sat on the mat"])):  # spaces are tokens
        template = parse_prompt("the [MASK:3] cat", chars)
        assert template.tokens[1:] == (*chars.encode("the "), None, None, None, *chars.encode(" cat"))
    byte = learn_tokenizer("byte", ["the cat sat on the mat"] * 20, vocab=300)  # words carry their space
    template = parse_prompt("the cat [MASK:2] on", byte)
    assert byte.decode(template.tokens[1 : template.tokens.index(None)]) == "the cat"


def test_prompts_file_jsonl_and_plain_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "w1 w2"}), json.dumps({"infill": "w1 [MASK:2] w3"}),
                               json.dumps({"ids": [4, None, 6]}), "w9 w8", ""]))
    prompts = read_prompts_file(path, SYN)
    assert [p.tokens for p in prompts] == [(32, 1, 2), (32, 1, None, None, 3), (32, 4, None, 6), (32, 9, 8)]
    path.write_text('{"prompt": "w1"\n')
    with pytest.raises(ConfigError, match="line 1 is not valid JSON"):
        read_prompts_file(path, SYN)
    path.write_text('{"prompt": "w1", "ids": [1]}\n')
    with pytest.raises(ConfigError, match="exactly one of"):
        read_prompts_file(path, SYN)
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt", SYN)


def test_start_rows_spans_and_marked_text():
    prompts = [parse_prompt("w1 [MASK:2] w3", SYN), parse_prompt("w4", SYN)]
    rows = start_rows(prompts, 6, SYN.mask_id)
    assert rows.tolist() == [[32, 1, 34, 34, 3, 34], [32, 4, 34, 34, 34, 34]]
    with pytest.raises(ConfigError, match="has 5 tokens"):
        start_rows(prompts, 4, SYN.mask_id)
    fixed = (rows[0] != SYN.mask_id).tolist()
    assert spans(fixed) == [[0, 2, "fixed"], [2, 4, "generated"], [4, 5, "fixed"], [5, 6, "generated"]]
    filled = [32, 1, 7, 8, 3, 33]
    assert marked_text(filled, fixed, SYN) == "[BOS] w1 [[w7 w8]] w3 [[[EOS]]]"


@pytest.mark.parametrize("total,context,stride,causal", [(32, 32, 16, False), (70, 32, 16, False), (33, 8, 3, False),
                                                          (70, 32, 16, True), (40, 32, 29, False), (200, 32, 1, True)])
def test_windows_cover_the_row_once_framed_like_training_rows(total, context, stride, causal):
    windows = window_plan(total, context, stride, causal=causal)
    committed = 0
    for index, window in enumerate(windows):
        size = window.bos + window.body + window.eos
        assert size == (context if not causal or index == len(windows) - 1 else min(context, total) - (total > context))
        assert window.start <= committed  # no gap: every window starts inside what is committed
        assert window.bos == (window.start > 0) and window.eos == (not causal and window.start + window.body < total)
        if 0 < index < len(windows) - 1:
            assert window.start + window.body - committed == stride  # stride new tokens
            assert committed - window.start == context - 2 - stride  # the prefix it keeps
        committed = max(committed, window.start + window.body)
    assert committed == total and windows[-1].start + windows[-1].body == total
    with pytest.raises(ConfigError, match="stride"):
        window_plan(total + 40, context, context - 2)


def test_long_rows_keep_fixed_tokens_and_committed_prefixes():
    """A recording stub fills every free slot with (window index * 10 + slot) % 30; the driver must hand each
    window the committed tokens between placeholder BOS/EOS, and the prompt tokens that fall into it."""
    mask, bos, eos, context, stride, total = 34, 32, 33, 8, 3, 20
    seen = []

    def stub(state, ids):
        seen.append((state.clone(), list(ids)))
        window = ids[0] // WINDOW_ID_STRIDE
        fill = (window * 10 + torch.arange(state.shape[1])) % 30
        return SampleBatch(tokens=torch.where(state == mask, fill.expand_as(state), state), nfe=1)

    x_init = torch.full((2, total), mask)
    x_init[:, 0], x_init[0, 14] = bos, 7  # BOS; a fixed token far beyond the first window
    out = generate_long(stub, x_init, [5, 6], context=context, stride=stride, bos_id=bos, eos_id=eos)
    plan = window_plan(total, context, stride)
    assert len(seen) == len(plan) and out.nfe == len(plan)
    assert bool((out.tokens != mask).all()) and out.tokens[0, 14] == 7 and bool((out.tokens[:, 0] == bos).all())
    for index, ((state, ids), window) in enumerate(zip(seen, plan)):
        assert ids == [5 + index * WINDOW_ID_STRIDE, 6 + index * WINDOW_ID_STRIDE] and state.shape[1] == context
        assert bool((state[:, 0] == bos).all()) and bool((state[:, -1] == eos).all()) == window.eos
        body = state[:, int(window.bos) : int(window.bos) + window.body]
        final = out.tokens[:, window.start : window.start + window.body]
        assert torch.equal(body[body != mask], final[body != mask])  # fixed slots were kept
    assert bool((out.tokens[:, 1:] != bos).all()) and bool((out.tokens != eos).all())  # no placeholder leaked


@pytest.mark.parametrize("sampler", ["mdlm", "edlm", "ar"])
def test_generator_writes_long_prompted_rows_with_every_sampler(sampler):
    """Tiny random DiT/AR models (V = 7, L = 8) write 20-token rows: fixed tokens kept, no mask left, rows
    independent of the batch split, and a row of the model's length is exactly the plain sampler's draw."""
    from edlm_dist.config.schema import ModelConfig
    from edlm_dist.models.build import build_model
    from edlm_dist.sampling.model_energies import AREnergy
    from edlm_dist.sampling.engine import ModelDenoiser, sample_batch
    from edlm_dist.sampling.generate import Generator
    from edlm_dist.sampling.settings import SamplerSettings

    vocab, length, mask, bos, eos = 7, 8, 6, 4, 5
    cfg = ModelConfig(hidden_size=16, n_blocks=1, n_heads=2, cond_dim=8)
    torch.manual_seed(0)
    dit, ar = build_model("dit", cfg, vocab, length).eval(), build_model("ar", cfg, vocab, length).eval()
    for model in (dit, ar):  # the output layers start at zero: give them weights
        torch.nn.init.normal_(model.output_layer.linear.weight, std=0.5)
    settings = SamplerSettings(sampler=sampler, steps=6, k=3, window=1.0, seed=2)
    generator = Generator(settings, length, mask, bos, eos, torch.device("cpu"), denoiser=ModelDenoiser(dit, mask, vocab),
                          energy_fn=AREnergy(ar, mask, carry_over=True), ar_model=ar)
    x_init = torch.full((3, 20), mask)
    x_init[:, 0] = bos
    x_init[0, 1:3] = torch.tensor([1, 2])  # a prompt
    if sampler != "ar":
        x_init[1, 12] = 3  # infilling inside a later window (the AR sampler continues prompts only)
    whole = generator.generate([0, 1, 2], x_init, stride=3).tokens
    fixed = x_init != mask
    assert torch.equal(whole[fixed], x_init[fixed]) and bool((whole != mask).all())
    parts = torch.cat([generator.generate([0], x_init[:1], stride=3).tokens,
                       generator.generate([1, 2], x_init[1:], stride=3).tokens])
    assert torch.equal(parts, whole)
    if sampler != "ar":
        one_window = generator.generate([0, 1], x_init[:2, :length])
        plain = sample_batch(generator.denoiser, settings, [0, 1], length=length, mask_id=mask,
                             energy_fn=generator.energy_fn, x_init=x_init[:2, :length])
        assert torch.equal(one_window.tokens, plain.tokens)
