"""Spec T5 (weights), T6 (length filter), T7 (predict-as-anchor decisions)."""

import math

import pytest
import torch

from kvcomm_sglang.estimator import (entropy_gate, estimate_offset, placeholder_distances,
                                     prefix_distances, softmax_weights, top_p_indices)

L, H, D = 4, 2, 8


def test_t5_weight_shapes_alignment_and_normalization():
    torch.manual_seed(0)
    base = torch.randn(L, 6, H, D)
    anchors = [torch.randn(L, n, H, D) for n in (6, 9, 12)]
    head = torch.stack([a[:, :6] for a in anchors])
    tail = torch.stack([a[:, a.shape[1] - 6:] for a in anchors])
    w_ph = softmax_weights(placeholder_distances(base, head))
    w_pf = softmax_weights(prefix_distances(base, tail))
    assert w_ph.shape == (3, 6) and w_pf.shape == (3, L, H, D)
    assert torch.allclose(w_ph.sum(0), torch.ones(6)) and torch.allclose(w_pf.sum(0), torch.ones(L, H, D))
    # head alignment and L1-mean metric
    expected = (base - anchors[1][:, :6]).abs().mean(dim=(0, 2, 3))
    assert torch.allclose(placeholder_distances(base, head)[1], expected)
    # tail alignment and L2 over tokens
    expected = torch.linalg.vector_norm(base - anchors[2][:, 6:], dim=1)
    assert torch.allclose(prefix_distances(base, tail)[2], expected)


def test_t5_identical_anchor_dominates_and_offset_equals_its_delta():
    torch.manual_seed(1)
    base = torch.randn(L, 5, H, D)
    far = [base + 50 + torch.randn_like(base) for _ in range(2)]
    embs = torch.stack([far[0], base.clone(), far[1]])
    w = softmax_weights(prefix_distances(base, embs))
    assert torch.all(w[1] > 0.999)
    deltas = torch.randn(3, L, 5, H, D)
    offset = estimate_offset(deltas, w[:, :, None])
    assert torch.allclose(offset, deltas[1], atol=1e-3)


def test_t6_length_filter_and_truncation():
    torch.manual_seed(2)
    cand = torch.randn(L, 10, H, D)
    anchors = [torch.randn(L, n, H, D) for n in (4, 10, 12)]
    res = entropy_gate(cand, anchors, gamma=1.0)
    assert res.available == (1, 2)                           # the 4-token anchor is filtered
    assert not res.is_new_anchor
    with pytest.raises(ValueError):
        estimate_offset(torch.randn(2, L, 3, H, D), torch.ones(3, 1, 3, 1, 1))


def test_t7_decisions():
    torch.manual_seed(3)
    cand = torch.randn(L, 5, H, D)
    # (a) 0 or 1 anchors -> new anchor
    assert entropy_gate(cand, [], 0.3).is_new_anchor
    assert entropy_gate(cand, [cand.clone()], 0.3).reason == "too_few_anchors"
    # (b) only one anchor long enough
    assert entropy_gate(cand, [cand.clone(), torch.randn(L, 3, H, D)], 0.3).is_new_anchor
    # (c) two equidistant anchors -> entropy 1 > gamma
    a, b = cand + 1.0, cand - 1.0
    res = entropy_gate(cand, [a, b], 0.3)
    assert res.is_new_anchor and res.reason == "ambiguous" and math.isclose(res.entropy, 1.0, rel_tol=1e-6)
    # (d) one much closer -> reusable; official quirk credits both (p_best >= 0.9)
    near, far = cand + 0.001, cand + 10.0
    res = entropy_gate(cand, [near, far], 0.3, credit="official")
    assert not res.is_new_anchor and set(res.credited) == {0, 1}
    res = entropy_gate(cand, [near, far], 0.3, credit="nucleus")
    assert res.credited == (0,)
    # (f) gamma >= 1 never returns True via entropy
    assert not entropy_gate(cand, [a, b], 1.0).is_new_anchor


def test_t7e_top_p_credit_modes():
    probs = torch.tensor([0.6, 0.35, 0.05], dtype=torch.float64)
    assert top_p_indices(probs, 0.9, "official") == [0]          # 0.95 crosses: excluded
    assert top_p_indices(probs, 0.9, "nucleus") == [0, 1]
    assert top_p_indices(torch.tensor([0.95, 0.05], dtype=torch.float64), 0.9, "official") == [0, 1]
    with pytest.raises(ValueError, match="credit mode"):
        top_p_indices(probs, 0.9, "greedy")


def test_cache_dtype_distances_are_coarser():
    torch.manual_seed(4)
    base = torch.randn(L, 8, H, D) * 30
    embs = torch.stack([base + torch.randn_like(base) * 0.01 for _ in range(2)]).half()
    d32 = prefix_distances(base, embs, "float32")
    d16 = prefix_distances(base, embs, "cache")
    assert d16.dtype == torch.float32 and not torch.equal(d32, d16)
