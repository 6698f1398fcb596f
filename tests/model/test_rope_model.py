"""Spec tests T1/T3 on the real model: RoPE delta rotation moves layer-0 keys exactly.

Layer-0 K and V of a token depend only on the token and (for K) its position, so a key computed
behind one prefix and delta-rotated equals the key recomputed behind another prefix at the new
position (T1), values are equal, and de-rotation to position 0 composes (T3). From layer 1 on the
context enters and the KV differ clearly: that difference is what anchors estimate.
"""

from __future__ import annotations

import pytest
import torch

from kvcomm_sglang.rope import rotate

pytestmark = pytest.mark.model

SEGMENT = "The quick brown fox jumps over the lazy dog near the quiet river bank."
FILLER = ("In a small village by the sea, people fished every morning and told stories "
          "in the evening. ")
SHIFTS = [(0, 29), (5, 37), (37, 5), (12, 12 + 64)]  # (p_old, p_new)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def prefix_ids(hf, length: int, text: str) -> list[int]:
    ids = hf.encode(text)
    return (ids * (length // len(ids) + 1))[:length]


def kv_behind(hf, prefix: list[int], segment: list[int]):
    """(k, v) of ``segment`` (L, N, H, D) computed behind ``prefix``, at len(prefix)..."""
    past = None
    if prefix:
        head = hf.prefill(prefix)
        past = (head.k, head.v)
    out = hf.prefill(segment, past, len(prefix))
    return out.k, out.v


@pytest.fixture(scope="module")
def segment(hf) -> list[int]:
    return hf.encode(SEGMENT)


@pytest.mark.parametrize("p_old, p_new", SHIFTS)
def test_layer0_key_delta_rotation_is_exact(hf, segment, p_old, p_new):
    k_old, v_old = kv_behind(hf, prefix_ids(hf, p_old, FILLER), segment)
    k_new, v_new = kv_behind(hf, prefix_ids(hf, p_new, "Numbers, colors and names: "), segment)
    delta = torch.full((len(segment),), p_new - p_old, dtype=torch.long)
    moved = rotate(k_old[0], delta, hf.rope)
    assert rel_err(moved, k_new[0]) < 1e-5
    assert rel_err(v_old[0], v_new[0]) < 1e-6
    assert rel_err(k_old[0], k_new[0]) > 1e-3, "test is vacuous: positions did not change K"


@pytest.mark.parametrize("p_old, p_new", SHIFTS)
def test_deeper_layers_differ_after_rotation(hf, segment, p_old, p_new):
    k_old, v_old = kv_behind(hf, prefix_ids(hf, p_old, FILLER), segment)
    k_new, v_new = kv_behind(hf, prefix_ids(hf, p_new, "Numbers, colors and names: "), segment)
    delta = torch.full((len(segment),), p_new - p_old, dtype=torch.long)
    for layer in range(1, hf.num_layers):
        moved = rotate(k_old[layer], delta, hf.rope)
        assert rel_err(moved, k_new[layer]) > 1e-3, f"layer {layer} K"
        assert rel_err(v_old[layer], v_new[layer]) > 1e-3, f"layer {layer} V"


@pytest.mark.parametrize("p_old, p_new", SHIFTS)
def test_layer0_derotate_then_rotate(hf, segment, p_old, p_new):
    k_old, _ = kv_behind(hf, prefix_ids(hf, p_old, FILLER), segment)
    k_new, _ = kv_behind(hf, prefix_ids(hf, p_new, "Numbers, colors and names: "), segment)
    offsets = torch.arange(len(segment))
    at_zero = rotate(k_old[0], -(p_old + offsets), hf.rope)  # position-0 frame, spec §2.4
    moved = rotate(at_zero, p_new + offsets, hf.rope)
    assert rel_err(moved, k_new[0]) < 1e-5


def test_prefill_behind_past_equals_one_prefill(hf, segment):
    ids = prefix_ids(hf, 20, FILLER) + segment
    whole = hf.prefill(ids)
    head = hf.prefill(ids[:20])
    tail = hf.prefill(ids[20:], (head.k, head.v), 20)
    assert rel_err(torch.cat([head.k, tail.k], dim=1), whole.k) < 1e-5
    assert rel_err(torch.cat([head.v, tail.v], dim=1), whole.v) < 1e-5
    assert rel_err(tail.logits_last, whole.logits_last) < 1e-5
    with pytest.raises(ValueError):
        hf.prefill(segment, (head.k, head.v), 19)


def test_generation_kv_is_the_fed_back_tokens(hf, segment):
    prompt = prefix_ids(hf, 10, FILLER) + segment
    gen = hf.generate_dense(prompt, max_new_tokens=6)
    assert 1 <= len(gen.ids) <= 6
    assert gen.k.shape[1] == len(gen.ids) - 1  # the final generated token has no KV
    assert gen.prompt_k.shape[1] == len(prompt)
    dense = hf.prefill(prompt + gen.ids[:-1])
    assert rel_err(torch.cat([gen.prompt_k, gen.k], dim=1), dense.k) < 1e-5
    assert rel_err(torch.cat([gen.prompt_v, gen.v], dim=1), dense.v) < 1e-5
    assert int(gen.logits_first.argmax()) == gen.ids[0]
