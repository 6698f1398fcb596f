"""Spec T8 (eviction), T12 (request overlay semantics), byte budget, config validation."""

import pytest
import torch

from kvcomm_sglang.anchors import AnchorRegistry, Deviation
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.kvblock import StoredKV

L, H, D = 2, 1, 4


def block(n):
    return StoredKV(torch.randn(L, n, H, D), torch.randn(L, n, H, D), torch.zeros(n, dtype=torch.long))


def dev(n=3, p=2):
    return Deviation(block(n), block(p))


def add(pool, key, consumer="a"):
    return pool.add(key, block(3), consumer, dev())


@pytest.mark.parametrize("faithful", [True, False])
def test_t8_lfu_within_window(faithful):
    cfg = KVCommConfig.faithful(max_anchors=3, window=2) if faithful else \
        KVCommConfig(max_anchors=3, window=2)
    pool = AnchorRegistry(cfg).pool("user_question")
    for key in "abc":
        assert add(pool, key) == []
    pool.credit(["a"])                           # counts a=1, b=0, c=0
    if faithful:                                 # official: evicts only when size > V -> V + 1
        assert add(pool, "d") == [] and len(pool) == 4
        assert add(pool, "e") == ["b"]           # window (a, b): min count is b
    else:
        assert add(pool, "d") == ["b"] and len(pool) == 3
        pool.credit(["c"])
        assert add(pool, "e") == ["a"]           # window (a, c) both count 1: first on ties
    assert len(pool) == cfg.pool_capacity


def test_t8_eviction_check_on_delta_update_is_official_only():
    official = AnchorRegistry(KVCommConfig.faithful(max_anchors=1, window=1)).pool("p")
    add(official, "x")
    add(official, "y")                              # official pool holds V + 1 = 2
    assert official.add("y", block(3), "b", dev()) == ["x"]   # a delta-only update evicts
    ours = AnchorRegistry(KVCommConfig(max_anchors=1, window=1)).pool("p")
    add(ours, "x")
    assert ours.add("x", block(3), "b", dev()) == []
    assert set(ours.anchors["x"].deviations) == {"a", "b"}


def test_compatible_filters_length_and_consumer():
    pool = AnchorRegistry(KVCommConfig()).pool("p")
    pool.add("long", block(5), "a", dev(5))
    pool.add("short", block(2), "a", dev(2))
    assert [a.key for a in pool.compatible(3, "a")] == ["long"]
    assert pool.compatible(3, "b") == []


def test_eviction_callback_sees_every_dropped_anchor():
    dropped = []
    registry = AnchorRegistry(KVCommConfig(max_anchors=2, window=2), on_evict=dropped.append)
    pool = registry.pool("p")
    for key in "abc":
        add(pool, key)
    assert [a.key for a in dropped] == ["a"]


def test_byte_budget_evicts():
    size = block(3).nbytes + dev().nbytes
    registry = AnchorRegistry(KVCommConfig(anchor_budget_bytes=2 * size + 1))
    pool = registry.pool("p")
    for key in "abcd":
        add(pool, key)
        registry.enforce_budget()
    assert registry.nbytes <= 2 * size + 1 and len(pool) == 2


def test_bad_inputs():
    pool = AnchorRegistry(KVCommConfig()).pool("p")
    with pytest.raises(ValueError, match="does not match"):
        pool.add("k", block(5), "a", dev(3))
    with pytest.raises(ValueError, match="one"):
        StoredKV(torch.randn(1, 2, 1, 4), torch.randn(1, 3, 1, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="positions"):
        StoredKV(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        pool.evict_one()


@pytest.mark.parametrize("field,value", [("gamma", -0.1), ("max_anchors", 0), ("window", 0),
                                         ("temperature", 0.0), ("top_p", 1.5),
                                         ("distance_dtype", "bf16"), ("top_p_credit", "x"),
                                         ("anchor_budget_bytes", 0), ("recompute_last", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        KVCommConfig(**{field: value})


def test_config_faithful_values():
    f = KVCommConfig.faithful()
    assert (f.gamma, f.max_anchors, f.window, f.temperature, f.top_p) == (0.3, 20, 5, 1.0, 0.9)
    assert f.pool_capacity == 21 and KVCommConfig().pool_capacity == 20
    assert not f.derotated_storage and f.first_corrected_layer == 1


def test_recompute_count_is_the_last_tokens_or_the_whole_last_piece():
    assert KVCommConfig().recompute_count(14) == 1
    assert KVCommConfig(recompute_last=16).recompute_count(14) == 16
    assert KVCommConfig(recompute_last_piece=True).recompute_count(14) == 14
    assert KVCommConfig(recompute_last=16, recompute_last_piece=True).recompute_count(14) == 16
