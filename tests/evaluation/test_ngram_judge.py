"""The Kneser-Ney n-gram judge: normalised at every order (exact enumeration), and equal to the closed form
computed independently for orders 1 and 2."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from edlm_dist.errors import DataError
from edlm_dist.evaluation.ngram_judge import START, KneserNeyJudge

V = 6
ROWS = [[0, 1, 2, 1, 2, 3], [0, 2, 1, 2, 1, 2, 4], [0, 1, 1, 1, 2, 3, 3], [0, 3, 2, 1]]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_conditional_sums_to_one(order):
    judge = KneserNeyJudge(order, V).fit(ROWS)
    histories = [()] + [h for n in range(1, order) for h in itertools.product([START, 0, 1, 2, 3, 5], repeat=n)]
    for history in histories:
        total = sum(judge.prob(history, w) for w in range(V))
        assert total == pytest.approx(1.0, abs=1e-12)  # float64 sums of V = 6 terms
        assert all(judge.prob(history, w) > 0 for w in range(V))  # unseen ids keep mass


def _discount(counts: Counter) -> float:
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    return n1 / (n1 + 2 * n2)


def test_unigram_closed_form():
    tokens = Counter(t for row in ROWS for t in row[1:])  # the first token of a row is given, not scored
    n, d = sum(tokens.values()), _discount(tokens)
    judge = KneserNeyJudge(1, V).fit(ROWS)
    for w in range(V):
        expected = max(tokens[w] - d, 0) / n + d * len(tokens) / n / V
        assert judge.prob((), w) == pytest.approx(expected, rel=1e-12)


def test_bigram_closed_form_with_continuation_unigrams():
    bigrams = Counter((row[i - 1], row[i]) for row in ROWS for i in range(1, len(row)))
    # Continuation unigram: in how many distinct bigram types does w come second.
    continuation = Counter(w for (_, w) in bigrams)
    d1, d2 = _discount(continuation), _discount(bigrams)
    types_total = sum(continuation.values())

    def p1(w):
        return max(continuation[w] - d1, 0) / types_total + d1 * len(continuation) / types_total / V

    judge = KneserNeyJudge(2, V).fit(ROWS)
    for h in range(V):
        after = {w: c for (a, w), c in bigrams.items() if a == h}
        for w in range(V):
            if after:
                total = sum(after.values())
                expected = max(after.get(w, 0) - d2, 0) / total + d2 * len(after) / total * p1(w)
            else:  # context never seen: the unigram alone
                expected = p1(w)
            assert judge.prob((h,), w) == pytest.approx(expected, rel=1e-12)


def test_gen_ppl_prefers_text_like_the_held_out_text():
    rng = np.random.default_rng(0)
    chain = np.array([[0.05, 0.8, 0.05, 0.05, 0.05], [0.05, 0.05, 0.8, 0.05, 0.05], [0.05, 0.05, 0.05, 0.8, 0.05],
                      [0.8, 0.05, 0.05, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])

    def sample(n):
        rows = []
        for _ in range(n):
            row = [0]
            for _ in range(20):
                row.append(int(rng.choice(5, p=chain[row[-1]])))
            rows.append(row)
        return rows

    judge = KneserNeyJudge(3, 5).fit(sample(200))
    like, unlike = judge.gen_ppl(sample(50)), judge.gen_ppl(rng.integers(0, 5, (50, 21)).tolist())
    entropy_rate = -sum(p * math.log(p) for p in chain[0])  # every row of `chain` but the last has it
    assert math.exp(entropy_rate) * 0.9 < like < math.exp(entropy_rate) * 1.3 < unlike
    row_nll, scored = judge.row_nll([0, 1, 2])
    assert scored == 2 and row_nll == pytest.approx(-math.log(judge.prob((START, 0), 1) * judge.prob((0, 1), 2)))
    nll, counts = judge.score_rows([{"tokens": [0, 1, 2]}, {"tokens": [0]}])  # the sample-file oracle interface
    assert nll.tolist() == [row_nll, 0.0] and counts.tolist() == [2.0, 0.0]
    with pytest.raises(DataError, match="outside the judge's vocabulary"):
        judge.row_nll([0, 7])


def _evaluate(overrides, out):
    from edlm_dist.config.load import load_config
    from edlm_dist.evaluation.run import run_evaluation

    return run_evaluation(load_config(None, overrides), out)


def test_edlm_eval_with_the_ngram_judge(tmp_path):
    """`edlm eval eval.oracle=ngram`: the judge is fitted on the validation rows only, the samples' Gen PPL is
    that judge's, and the data reference is scored on training rows (unseen by the judge)."""
    import json

    from edlm_dist.artifacts.samples import write_sample_folder
    from edlm_dist.data.prepare import prepare_data
    from edlm_dist.data.shards import iter_shard_rows, load_manifest
    from tests.spawn import run_on_ranks

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Rule {i}: simple is better than complex, flat beats nested." for i in range(60)))
    data = tmp_path / "data"
    prepare_data("text", data, seq_len=16, tokenizer_spec="char", input_path=corpus, progress=False)
    manifest = load_manifest(data)
    valid = [r.tolist() for s in manifest["splits"]["valid"]["shards"] for r in iter_shard_rows(data / s["file"])]
    train = [r.tolist() for s in manifest["splits"]["train"]["shards"] for r in iter_shard_rows(data / s["file"])]
    samples = [train[0], train[3][::-1], valid[0]]
    (tmp_path / "samples").mkdir()
    path = write_sample_folder(tmp_path / "samples", [{"tokens": row} for row in samples], {"sampler": "mdlm"})
    run_on_ranks(_evaluate, 1, [f"data.dir={data}", "eval.oracle=ngram", "eval.judge_order=3",
                                "eval.metrics=[genppl,entropy]", f"eval.samples=[{path}]",
                                "logging.progress=false"], tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    judge = KneserNeyJudge(3, manifest["vocab_size"]).fit(valid)
    assert metrics["samples"][0]["gen_ppl"] == pytest.approx(judge.gen_ppl(samples), rel=1e-12)
    reference = metrics["data_reference"]
    assert reference["split"] == "train" and reference["gen_ppl"] == pytest.approx(judge.gen_ppl(train[:3]), rel=1e-12)
