"""Exactness as a property of the whole tree, not of one path: random sequences of inserts,
approximate load-backs, plain matches (which split nodes), chunked caching of plain requests
and evictions, on SGLang's own CPU pools. After every step no plain request's match or row
holds an approximate slot, and the invariant checker finds nothing."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from tests.server.cpu_pools import Req, admit, make_cache, namespace, release

TOKENS = st.lists(st.integers(1, 4), min_size=2, max_size=9)   # few symbols: paths overlap
OPS = st.lists(st.tuples(st.sampled_from(["insert", "approx", "match", "chunk", "evict"]),
                         TOKENS, TOKENS), min_size=1, max_size=12)


def step(cache, ns, op, head, tail, plain):
    if op == "insert":
        slots = cache.token_to_kv_pool_allocator.alloc(len(head + tail))
        if slots is not None:
            found = cache.insert(InsertParams(key=RadixKey(head + tail, ns), value=slots))
            cache.token_to_kv_pool_allocator.free(slots[:found.prefix_len])   # duplicates
    elif op == "approx":                   # what init_load_back does: a new marked leaf
        key = RadixKey(head + tail, ns)
        match = cache.match_prefix(MatchPrefixParams(key=key))
        have = len(match.device_indices)
        slots = cache.token_to_kv_pool_allocator.alloc(len(key) - have)
        if have < len(key) and slots is not None:
            cache.insert(InsertParams(key=key, value=torch.cat([match.device_indices, slots])))
            leaf = cache.match_prefix(MatchPrefixParams(key=key)).last_device_node
            leaf.kvcomm_approx = True
            cache.checker.approx_written(leaf.value)
    elif op == "match":
        req = Req(head + tail + [9], ns)
        served = cache.match_prefix(MatchPrefixParams(key=RadixKey(head + tail, ns), req=req))
        assert not cache.checker.approx & set(served.device_indices.tolist())
    elif op == "chunk" and cache.token_to_kv_pool_allocator.available_size() > 20:
        req = Req(head + tail + [9], ns)
        admit(cache, req)
        plain.append(req)
        cache.cache_unfinished_req(req, chunked=True)
    elif op == "evict":
        cache.evict(EvictParams(num_tokens=len(head)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_no_plain_request_ever_sees_approximate_kv(ops):
    cache, ns, plain = make_cache(size=512), namespace(), []
    for op, head, tail in ops:
        step(cache, ns, op, head, tail, plain)
        assert cache.checker.check(plain) == [], (op, head, tail)
    for req in plain:
        release(cache, req)
    assert cache.checker.check() == []
