"""The block-causal DiT (model.block_size = b < L) against independent truths.

* b = L is MDLM: the same logits, bit for bit, as a model without block_size, and x0 is ignored.
* Block 0 of a block-causal model equals the plain bidirectional DiT run on its b tokens alone; b = 1
  equals the same weights under SDPA's own causal kernel (is_causal=True), a separate code path.
* Block-causality by intervention: block j's training logits move with x_t's block j and x0's blocks
  < j, and with nothing else; the one-stream logits of block j do not depend on later positions.
* The training forward [x_t ; x0] and the one-stream sampling forward agree on block j whenever the
  one-stream row holds x0's blocks < j (the sampler's situation), to fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from edlm_dist.errors import ConfigError
from edlm_dist.models.block_attention import block_causal_mask, chunk_mask, two_stream_mask
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import full_state_dict, load_full_state_dict
from model_helpers import randomised, tiny  # noqa: E402

V, L, B = 11, 8, 3
ATOL = 1e-5  # fp32 logits of O(1) through 2 small blocks: different kernels/shapes, same math


def _rows(seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def _same_weights(block_size: int, like: torch.nn.Module, length: int = L):
    model = build_model("dit", tiny(block_size=block_size), V, length)
    load_full_state_dict(model, full_state_dict(like))
    return model.eval()


def test_block_size_equal_to_length_is_mdlm_bit_for_bit():
    mdlm = randomised("dit", tiny(), vocab=V, length=L).eval()
    for block in (0, L):
        model = _same_weights(block, mdlm)
        assert not model.is_block_causal
        x_t, x0 = _rows(1), _rows(2)
        assert torch.equal(model(x_t), mdlm(x_t))
        assert torch.equal(model(x_t, x0=x0), mdlm(x_t))  # x0 is ignored when one block covers the row


def test_first_block_is_the_bidirectional_dit_on_its_own_tokens():
    block = randomised("dit", tiny(block_size=4), vocab=V, length=L).eval()
    mdlm_on_4 = build_model("dit", tiny(), V, 4)
    load_full_state_dict(mdlm_on_4, full_state_dict(block))
    rows = _rows(3)
    torch.testing.assert_close(block(rows)[:, :4], mdlm_on_4.eval()(rows[:, :4]), atol=ATOL, rtol=0)


def test_block_size_one_is_causal_attention():
    block = randomised("dit", tiny(block_size=1), vocab=V, length=L).eval()
    rows = _rows(4)
    for layer in block.blocks:
        layer.causal = True  # SDPA's is_causal kernel, used when no mask is passed
    block.block_size = L  # no mask: plain forward through is_causal
    causal = block(rows)
    block.block_size = 1
    for layer in block.blocks:
        layer.causal = False
    torch.testing.assert_close(block(rows), causal, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_training_logits_depend_on_exactly_the_noisy_block_and_the_clean_prefix(block_size):
    model = randomised("dit", tiny(block_size=block_size), vocab=V, length=L).eval()
    x_t, x0 = _rows(5), _rows(6)
    base = model(x_t, x0=x0)
    for j in range(L // block_size):
        own = slice(j * block_size, (j + 1) * block_size)
        for which, position in (("x_t", p) for p in range(L)):
            changed = x_t.clone()
            changed[:, position] = (changed[:, position] + 1) % V
            moved = (model(changed, x0=x0)[:, own] - base[:, own]).abs().max().item()
            inside = own.start <= position < own.stop
            assert (moved > 1e-4) if inside else (moved == 0.0), (which, j, position, moved)
        for position in range(L):
            changed = x0.clone()
            changed[:, position] = (changed[:, position] + 1) % V
            moved = (model(x_t, x0=changed)[:, own] - base[:, own]).abs().max().item()
            assert (moved > 1e-4) if position < own.start else (moved == 0.0), ("x0", j, position, moved)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_one_stream_block_logits_equal_training_logits_given_a_clean_prefix(block_size):
    model = randomised("dit", tiny(block_size=block_size), vocab=V, length=L).eval()
    x_t, x0 = _rows(7), _rows(8)
    training = model(x_t, x0=x0)
    for j in range(L // block_size):
        own = slice(j * block_size, (j + 1) * block_size)
        row = torch.cat([x0[:, :own.start], x_t[:, own.start:]], dim=1)  # committed prefix, then x_t
        torch.testing.assert_close(model(row)[:, own], training[:, own], atol=ATOL, rtol=0)
        # Nothing after the block matters, and a shorter row gives the same logits.
        truncated = _same_weights(block_size, model, length=own.stop)
        torch.testing.assert_close(truncated(row[:, :own.stop])[:, own], training[:, own], atol=ATOL, rtol=0)


def test_masks_are_the_stated_rule():
    b = 2
    one = block_causal_mask(6, b)
    for q in range(6):
        for k in range(6):
            assert one[q, k].item() == (k // b <= q // b)
    two = two_stream_mask(6, b)
    for q in range(12):
        for k in range(12):
            q_clean, k_clean, qb, kb = q >= 6, k >= 6, (q % 6) // b, (k % 6) // b
            expected = (kb == qb and not k_clean) or (k_clean and kb < qb) if not q_clean else (k_clean and kb <= qb)
            assert two[q, k].item() == expected, (q, k)
    assert torch.equal(chunk_mask(4, 2, b), one[4:6])


def test_bad_block_sizes_are_refused():
    with pytest.raises(ConfigError, match="divide"):
        build_model("dit", tiny(block_size=3), V, L)
    with pytest.raises(ConfigError, match="time_conditioning"):
        build_model("dit", tiny(block_size=2, time_conditioning=True), V, L)
    with pytest.raises(ConfigError, match="block_size"):
        build_model("dit", tiny(block_size=L + 1), V, L)
