"""KVCommRadixCache on real SGLang 0.5.17 CPU pools, no server: exactness hygiene and store
accounting (reference/sglang-on-cpu.md §3.1 recipe)."""

import types

import pytest
import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from kvcomm_sglang.runtime_patch.radix_cache import KVCommRadixCache
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.rope import RopeSpec
from kvcomm_sglang.runtime_patch.runtime import Decision, KVCommRuntime
from kvcomm_sglang.runtime_patch.segment_store import StoreFull


@pytest.fixture
def cache():
    pool = MHATokenToKVPool(size=64, page_size=1, dtype=torch.float32, head_num=2, head_dim=8,
                            layer_num=2, device="cpu", enable_memory_saver=False,
                            enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(size=64, dtype=torch.float32, device="cpu", kvcache=pool,
                                       need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(4, 32, "cpu", False),
                             token_to_kv_pool_allocator=allocator, page_size=1)
    config = KVCommConfig(store_budget_fraction=0.25, namespace_quota_fraction=1.0)  # 16 of 64
    return KVCommRadixCache(params, lambda c: KVCommRuntime(
        config, RopeSpec.build(8, 10000.0), pool, allocator, 64,
        c.req_to_token_pool.req_to_token, make_room=c.make_room))


def plain_req():
    return types.SimpleNamespace(rid="r", extra_key="kvcomm:x",
                                 sampling_params=types.SimpleNamespace(custom_params=None))


def insert(cache, tokens):
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    cache.insert(InsertParams(key=RadixKey(list(tokens), "kvcomm:x"), value=slots))
    return slots


def test_requests_never_match_approximate_nodes(cache):
    insert(cache, [1, 2, 3, 4, 5, 6])
    node = cache.match_prefix(MatchPrefixParams(key=RadixKey([1, 2, 3, 9], "kvcomm:x"))).last_device_node
    tail = node.children[RadixKey([4], "kvcomm:x").child_key(1)]
    tail.kvcomm_approx = True                             # [4, 5, 6] was materialized by KVCOMM
    req = plain_req()
    key = RadixKey([1, 2, 3, 4, 5, 6, 7], "kvcomm:x")
    internal = cache.match_prefix(MatchPrefixParams(key=key))
    assert len(internal.device_indices) == 6              # SGLang's own re-matches see it all
    served = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    assert len(served.device_indices) == 3 and served.last_device_node is node
    assert req.skip_radix_cache_insert                    # kept out of the tree: exact decode


def test_plain_requests_match_exactly_as_radix_cache(cache):
    insert(cache, [1, 2, 3, 4])
    req = plain_req()
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey([1, 2, 3, 4, 5], "kvcomm:x"),
                                                  req=req))
    assert len(result.device_indices) == 4 and not hasattr(req, "skip_radix_cache_insert")


def test_store_slots_are_counted_evictable_and_evicted_last(cache):
    allocator = cache.token_to_kv_pool_allocator
    total = allocator.available_size()
    block = cache.runtime.store.make(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8),
                                     torch.zeros(5, dtype=torch.long))
    insert(cache, [7, 8, 9])
    assert cache.evictable_size() == 3 + 5
    assert allocator.available_size() + cache.evictable_size() + cache.protected_size() == total
    assert torch.allclose(block.k, cache.runtime.store.gather(cache.runtime.store.pool.k_buffer,
                                                              block.slots))
    cache.runtime.store.free(block)
    assert allocator.available_size() + cache.evictable_size() == total
    with pytest.raises(StoreFull):
        cache.runtime.store.alloc(17)                     # over the store's 16-token budget
    cache.evict(EvictParams(num_tokens=100))
    assert allocator.available_size() == total


def test_store_budget_evicts_old_messages_and_anchor_budget_follows_the_store(cache):
    """Captures beyond the store's budget evict the least recently bound messages of the
    namespace (not the namespace, not a message a queued request was planned with); the
    anchors' byte budget is a share of the store's."""
    runtime = cache.runtime
    store = runtime.store
    assert runtime.config.anchor_budget_bytes == int(0.75 * store.quota_tokens
                                                      * store.bytes_per_token)
    ns = runtime.namespace("kvcomm:x")

    def capture(message, n, token):
        content = ns.state.register_content("user_question", [token] * n, torch.randn(2, n, 2, 8),
                                            torch.randn(2, n, 2, 8), torch.arange(n))
        ns.bind(message, content.key)
        return content.key

    first = capture("m0", 6, 1)
    runtime.decisions["queued"] = Decision("dense", keys={"user_question": first}, ns=ns)
    second = capture("m1", 6, 2)
    third = capture("m2", 6, 3)                       # 18 > 16: m1 goes, m0 is in use
    assert list(ns.messages) == ["m0", "m2"] and store.tokens == 12
    assert first in ns.state.contents and second not in ns.state.contents
    assert "kvcomm:x" in runtime.namespaces and third in ns.state.contents
    with pytest.raises(StoreFull):
        store.alloc(17)                               # more than the whole budget: refused


def test_store_makes_room_inside_a_free_group(cache):
    """A capture runs in cache_finished_req, inside SGLang's free group: tree leaves evicted to
    make room for the store must be allocatable at once, and the group must stay open for the
    frees SGLang collects after it."""
    allocator = cache.token_to_kv_pool_allocator
    insert(cache, list(range(100, 100 + allocator.available_size())))      # pool full: tree
    assert allocator.available_size() == 0
    allocator.free_group_begin()
    block = cache.runtime.store.make(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8),
                                     torch.zeros(5, dtype=torch.long))
    assert block.length == 5 and cache.runtime.store.tokens == 5
    assert allocator.is_not_in_free_group is False
    later = allocator.alloc(1)
    allocator.free(later)                                 # collected by the group, not freed
    assert not torch.isin(later, allocator.free_pages).any()
    allocator.free_group_end()
    assert torch.isin(later, allocator.free_pages).any()


def test_hints_are_decoded_once_per_request(cache, monkeypatch):
    """The scheduler matches a request's prefix several times: its hints are parsed once, and
    again only if its custom_params object changes."""
    from kvcomm_sglang import protocol
    from kvcomm_sglang.runtime_patch import runtime as runtime_module

    calls = []
    decode = protocol.decode
    monkeypatch.setattr(runtime_module.protocol, "decode",
                        lambda custom: (calls.append(custom), decode(custom))[1])
    req = plain_req()
    req.sampling_params.custom_params = protocol.encode(agent="a", layout=[
        protocol.Piece("template", 3)], template=True)
    calls.clear()                                        # encode validates by decoding
    runtime = cache.runtime
    first = runtime.hints_of(req)
    assert runtime.hints_of(req) is first and first.template and len(calls) == 1
    req.sampling_params.custom_params = {"kvcomm": "not json"}
    assert runtime.hints_of(req) is None and len(calls) == 2
    assert runtime.hints_of(req) is None and len(calls) == 2


def test_namespaces_share_one_match_cache_budget(cache):
    """The distances and weights cached outside the KV pool count against one server-wide
    budget; a namespace that goes away gives its share back."""
    runtime = cache.runtime
    a, b = runtime.namespace("kvcomm:a"), runtime.namespace("kvcomm:b")
    assert a.state.cache is b.state.cache is runtime.match_cache
    for ns, token in ((a, 1), (b, 2)):
        content = ns.state.register_content("user_question", [token] * 4, torch.randn(2, 4, 2, 8),
                                            torch.randn(2, 4, 2, 8), torch.arange(4))
        content.cache_nbytes = 1000                  # stands in for distances and weights
        ns.state.cache.update(content)
    assert runtime.match_cache.used == 2000
    runtime.drop_namespace("kvcomm:a")
    assert runtime.match_cache.used == 1000 and len(runtime.match_cache.entries) == 1


@pytest.mark.parametrize("approx", [False, True])
def test_a_prompt_the_tree_holds_whole_is_reuse_only_where_it_reads_approximate_kv(cache,
                                                                                     approx):
    """A reuse decision whose span the tree already holds: an all-exact path is SGLang's own
    radix hit (reported and counted dense, ``radix_hit``), a path through approximate nodes is
    reuse of those tokens; before, both said ``reuse`` with 0 tokens."""
    from kvcomm_sglang.runtime_patch.report import REPORT_KEY

    insert(cache, [1, 2, 3, 4, 5, 6])
    if approx:
        node = cache.match_prefix(MatchPrefixParams(key=RadixKey([1, 2, 9], "kvcomm:x")))
        node.last_device_node.children[RadixKey([3], "kvcomm:x").child_key(1)].kvcomm_approx = True
    req = plain_req()
    req.origin_input_ids = [1, 2, 3, 4, 5, 6, 7]
    decision = Decision("reuse", recompute=1)
    cache.runtime.decide = lambda r: decision
    cache.runtime.decisions[req.rid] = decision
    served = cache.match_prefix(MatchPrefixParams(key=RadixKey(req.origin_input_ids, "kvcomm:x"),
                                                  req=req))
    assert len(served.device_indices) == 6
    report = req.customized_info[REPORT_KEY][0]
    if approx:
        assert (report["mode"], report["reused_tokens"]) == ("reuse", 4)
        assert decision.kind == "reuse" and decision.reused == 4
    else:
        assert (report["mode"], report["fallback_reason"]) == ("dense", "radix_hit")
        assert decision.kind == "dense" and decision.reused == 0
