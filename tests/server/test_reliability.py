"""Issue 13's review findings, each as a test on SGLang's own CPU pools (no server), and the
invariant checker that proves the rules after every step: exactness across radix splits and
inserts, one owner per store slot, decisions that end with their request, planning that fails
closed, and namespaces that cannot crowd each other out."""

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.protocol import Piece
from kvcomm_sglang.runtime_patch.segment_store import StoreFull
from tests.server.cpu_pools import (FINISH_ABORT, Req, admit, make_cache, namespace,
                                    pool_is_whole, release, serve)


def insert(cache, tokens, extra_key):
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    cache.insert(InsertParams(key=RadixKey(list(tokens), extra_key), value=slots))
    return slots


def mark_tail_approx(cache, ns, head, tail):
    """[head | tail] in the tree, ``tail``'s node holding approximate KV (as load-back makes)."""
    insert(cache, head + tail, ns)
    node = cache.match_prefix(MatchPrefixParams(key=RadixKey(head, ns))).last_device_node
    child = node.children[RadixKey(tail[:1], ns).child_key(1)]
    child.kvcomm_approx = True
    cache.checker.approx_written(child.value)
    return child


def assert_invariants(cache, live=()):
    assert cache.checker.check(live) == []


# ---- 1. exactness: approximate KV never reaches a request that did not opt in ----
def test_a_split_of_an_approximate_node_stays_approximate():
    cache, ns = make_cache(), namespace()
    mark_tail_approx(cache, ns, [1, 2, 3], [4, 5, 6])
    req = Req([1, 2, 3, 4, 5, 7, 8], ns)
    served = cache.match_prefix(MatchPrefixParams(key=RadixKey([1, 2, 3, 4, 5, 7], ns), req=req))
    assert len(served.device_indices) == 3            # [4, 5] split off [4, 5, 6]: still approximate
    assert req.skip_radix_cache_insert
    assert_invariants(cache)


def test_a_chunked_exact_request_never_adopts_approximate_slots():
    """An approximate node appears under a plain request's path while it prefills in chunks:
    caching its chunk must not swap its exact KV for the approximate copy."""
    cache, ns = make_cache(), namespace()
    req = Req([1, 2, 3, 4, 5, 6, 7, 8], ns)
    admit(cache, req)
    mark_tail_approx(cache, ns, [1, 2, 3], [4, 5, 6])
    own = cache.req_to_token_pool.req_to_token[req.req_pool_idx, :8].clone()
    cache.cache_unfinished_req(req, chunked=True)
    assert torch.equal(cache.req_to_token_pool.req_to_token[req.req_pool_idx, :8], own)
    assert_invariants(cache, [req])
    release(cache, req)
    assert_invariants(cache)


# ---- 2. one owner per store slot ----
def test_a_repeated_answer_leaks_no_slot():
    cache, ns = make_cache(size=64), namespace()
    runtime = cache.runtime
    space = runtime.namespace(ns)
    for message in ("m1", "m2"):             # the same answer twice: one content key
        content = space.state.register_content("user_question", [5, 6, 7], torch.randn(2, 3, 2, 8),
                                               torch.randn(2, 3, 2, 8), torch.arange(3))
        space.bind(message, content.key)
    runtime.drop_namespace(ns)
    assert runtime.store.tokens == 0 and pool_is_whole(cache)
    assert cache.token_to_kv_pool_allocator.available_size() == 64
    assert_invariants(cache)


def test_a_template_that_does_not_fit_gives_every_slot_back():
    cache, ns = make_cache(size=64, store_budget_fraction=0.25), namespace()   # 16 store tokens
    layout = [Piece("template", 10), Piece("content", 2, "user_question", "q"),
              Piece("template", 10)]
    serve(cache, list(range(10, 32)), ns, {"agent": "a", "layout": layout, "template": True})
    runtime = cache.runtime
    assert runtime.stats.fallbacks["store_full"] == 1
    assert runtime.store.tokens == 0 and "a" not in runtime.namespace(ns).state.templates
    assert_invariants(cache)
    cache.evict(type("P", (), {"num_tokens": 1000})())
    assert cache.token_to_kv_pool_allocator.available_size() == 64


def test_faithful_anchor_embeddings_replaced_leak_nothing():
    cache, ns = make_cache(size=256), namespace()
    cache.runtime.config = cache.runtime.config.replace(derotated_storage=False)
    runtime = cache.runtime
    space = runtime.namespace(ns)
    state = space.state
    state.register_template("a", [(1, 2), (3,)], ["user_question"], torch.randn(2, 6, 2, 8),
                            torch.randn(2, 6, 2, 8), [(0, 2), (5, 6)])
    state.register_template("b", [(1, 2), (3,)], ["user_question"], torch.randn(2, 6, 2, 8),
                            torch.randn(2, 6, 2, 8), [(0, 2), (5, 6)])
    content = state.register_content("user_question", [8, 9, 10], torch.randn(2, 3, 2, 8),
                                     torch.randn(2, 3, 2, 8), torch.arange(2, 5))
    space.bind("q", content.key)
    for agent in ("a", "b"):                 # the second replaces the anchor's embedding
        state.record(agent, {"user_question": content.key}, ["user_question"],
                     torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8))
    runtime.drop_namespace(ns)
    assert runtime.store.tokens == 0 and pool_is_whole(cache)


# ---- 3. decisions end with their request ----
def consumer_setup(cache, ns):
    """Agent "a"'s template and message "q" registered: a consumer request is planned."""
    layout = [Piece("template", 3), Piece("content", 3, "user_question", "q"),
              Piece("template", 2)]
    serve(cache, [1, 2, 3, 50, 51, 52, 4, 5], ns, {"agent": "a", "layout": layout,
                                                    "template": True})
    serve(cache, [90, 60, 61, 62], ns, {"base": ("q", "user_question", 1)})
    return [1, 2, 3, 60, 61, 62, 4, 5], {"agent": "a", "layout": layout}


def test_a_request_aborted_while_queued_leaves_no_decision():
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    req = Req(ids, ns, hints)
    cache.match_prefix(MatchPrefixParams(key=RadixKey(ids[:-1], ns), req=req))
    assert req.rid in cache.runtime.decisions
    cache.after_batch(live_reqs=[])                    # the scheduler dropped it from its queue
    assert cache.runtime.decisions == {}
    assert_invariants(cache)


def test_a_retracted_request_is_neither_captured_nor_counted_twice():
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    req = Req(ids, ns, {**hints, "capture": ("r", "agent_0_current")}, output_ids=[70, 71, 72])
    admit(cache, req)
    release(cache, req, finished=None, is_insert=False)       # retracted: KV released
    space = cache.runtime.namespace(ns)
    assert "r" not in space.messages and cache.runtime.stats.calls == 0
    admit(cache, req)                                          # re-admitted, then finished
    release(cache, req)
    assert "r" in space.messages and cache.runtime.stats.calls == 1
    assert_invariants(cache)


def test_an_aborted_request_captures_nothing():
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    req = Req(ids, ns, {**hints, "capture": ("r", "agent_0_current")}, output_ids=[70, 71, 72])
    admit(cache, req)
    release(cache, req, finished=FINISH_ABORT)
    assert "r" not in cache.runtime.namespace(ns).messages
    assert cache.runtime.stats.fallbacks["aborted"] == 1 and cache.runtime.decisions == {}
    assert_invariants(cache)


# ---- 4. planning fails closed ----
def test_an_error_or_oom_in_planning_computes_densely(monkeypatch):
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    state = cache.runtime.namespace(ns).state

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(state, "plan", boom)
    req = Req(ids, ns, hints)
    assert admit(cache, req) < len(ids) - 1                    # no host hit: dense prefill
    assert cache.runtime.decisions[req.rid].reason == "plan_error:OutOfMemoryError"
    release(cache, req)
    assert cache.runtime.stats.fallbacks["plan_error"] == 1
    assert_invariants(cache)


# ---- 6. namespaces cannot crowd each other out ----
def test_new_namespaces_never_replace_active_ones():
    cache = make_cache(max_namespaces=2)
    first, second, flood = namespace(), namespace(), namespace()
    consumer_setup(cache, first)
    consumer_setup(cache, second)
    ids, hints = consumer_setup(cache, flood)
    req = Req(ids, flood, hints)
    cache.match_prefix(MatchPrefixParams(key=RadixKey(ids[:-1], flood), req=req))
    assert cache.runtime.decisions[req.rid].reason == "namespace_limit"
    assert first in cache.runtime.namespaces and second in cache.runtime.namespaces
    assert cache.runtime.namespace(first).state.templates          # agent a's, kept
    cache.runtime.config = cache.runtime.config.replace(namespace_idle_s=0.0)
    cache.after_batch([])
    assert cache.runtime.namespaces.get(flood) is not None       # now an idle one gives way
    assert len(cache.runtime.namespaces) == 2
    assert_invariants(cache)


def test_a_namespace_over_its_quota_evicts_only_its_own_state():
    cache = make_cache(size=128, store_budget_fraction=0.5, namespace_quota_fraction=0.5)
    quiet, busy = namespace(), namespace()                 # store 64 tokens, quota 32 each
    runtime = cache.runtime
    calm = runtime.namespace(quiet)
    content = calm.state.register_content("user_question", list(range(20)),
                                          torch.randn(2, 20, 2, 8), torch.randn(2, 20, 2, 8),
                                          torch.arange(20))
    calm.bind("q", content.key)
    loud = runtime.namespace(busy)
    for i in range(6):                                     # 6 x 12 tokens > its 32
        with runtime.store.building(busy):
            content = loud.state.register_content("user_question", [100 + i] * 12,
                                                  torch.randn(2, 12, 2, 8),
                                                  torch.randn(2, 12, 2, 8), torch.arange(12))
            loud.bind(f"m{i}", content.key)
        runtime.sweep(loud)
    assert "q" in calm.messages and runtime.store.usage[quiet] == 20
    assert runtime.store.usage[busy] <= 32 and "m5" in loud.messages
    assert_invariants(cache)


def test_the_store_budget_evicts_templates_of_the_largest_namespace():
    cache = make_cache(size=128, store_budget_fraction=0.25, namespace_quota_fraction=1.0)
    small, large = namespace(), namespace()                # store 32 tokens
    runtime = cache.runtime
    for ns, n in ((small, 4), (large, 24)):
        runtime.namespace(ns).state.register_template(
            "a", [tuple(range(n))], [], torch.randn(2, n, 2, 8), torch.randn(2, n, 2, 8),
            [(0, n)])
    third = namespace()
    with runtime.store.building(third):
        runtime.namespace(third).state.register_template(
            "a", [tuple(range(8))], [], torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8),
            [(0, 8)])
    assert "a" in runtime.namespace(small).state.templates
    assert "a" not in runtime.namespace(large).state.templates
    assert_invariants(cache)


def test_agent_labels_are_bounded():
    from prometheus_client import CollectorRegistry

    from kvcomm_sglang.runtime_patch.report import MAX_AGENT_LABELS, Metrics

    metrics = Metrics({"tp_rank": "0"}, registry=CollectorRegistry())
    for i in range(3 * MAX_AGENT_LABELS):
        metrics.call(f"agent{i}", "dense", 10, 0)
    labels = {s.labels["agent"] for m in metrics.calls.collect() for s in m.samples}
    assert len(labels) == MAX_AGENT_LABELS + 1 and "other" in labels


# ---- the checker itself finds what it is there to find ----
def test_the_checker_reports_leaks_lost_blocks_and_unmarked_approximate_nodes():
    cache, ns = make_cache(), namespace()
    consumer_setup(cache, ns)
    runtime, space = cache.runtime, cache.runtime.namespace(ns)
    key = space.messages["q"]
    block = space.state.contents[key].kv
    runtime.store.free(block)                             # freed behind the state's back
    assert any(v.startswith("lost") for v in cache.checker.check())
    space.state.contents.pop(key)                         # a reference dropped, no sweep
    template = next(iter(space.state.templates.values()))
    template.pieces = template.pieces[:1]
    assert any(v.startswith("leak") for v in cache.checker.check())
    runtime.sweep_workflow(space)
    node = mark_tail_approx(cache, ns, [200, 201], [202, 203])
    node.kvcomm_approx = False
    assert any(v.startswith("exactness") for v in cache.checker.check())


def test_config_rejects_bad_bounds():
    import pytest

    for bad in ({"max_namespaces": 0}, {"namespace_quota_fraction": 0.0},
                {"namespace_idle_s": -1.0}):
        with pytest.raises(ValueError):
            KVCommConfig(**bad)
    with pytest.raises(StoreFull):
        make_cache(size=64, store_budget_fraction=0.25).runtime.store.alloc(17, "x")


def test_a_changed_template_is_a_new_template_without_the_old_ones_deviations():
    """Templates are found by their tokens: the same pass again changes nothing, an agent whose
    template changed gets a new template, and the anchors hold no deviation for it (those
    learned under the old template stay with the old one)."""
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    serve(cache, ids, ns, hints)                       # dense: records the template's deviations
    state = cache.runtime.namespace(ns).state
    pool, (old,) = state.anchors.pool("user_question"), list(state.templates)
    assert len(pool) and all(old in anchor.deviations for anchor in pool.anchors.values())
    same = [Piece("template", 3), Piece("content", 3, "user_question", "q"),
            Piece("template", 2)]
    serve(cache, [1, 2, 3, 50, 51, 52, 4, 5], ns, {"agent": "a", "layout": same, "template": True})
    assert list(state.templates) == [old]
    serve(cache, [1, 2, 9, 50, 51, 52, 4, 5], ns, {"agent": "a", "layout": same, "template": True})
    (new,) = set(state.templates) - {old}
    assert not any(new in anchor.deviations for anchor in pool.anchors.values())
    assert all(old in anchor.deviations for anchor in pool.anchors.values())
    req = serve(cache, [1, 2, 9, 60, 61, 62, 4, 5], ns, hints)      # the new template's call
    assert req.customized_info["kvcomm"][0]["mode"] == "dense"
    assert_invariants(cache)


def test_a_message_evicted_before_planning_falls_back_with_its_reason():
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    space = cache.runtime.namespace(ns)
    cache.runtime.namespaces.evict_within(space, 1)       # store pressure takes message "q"
    assert "q" not in space.messages
    req = Req(ids, ns, hints)
    admit(cache, req)
    assert cache.runtime.decisions[req.rid].reason == "unknown_message"
    release(cache, req)
    assert cache.runtime.stats.fallbacks["unknown_message"] == 1
    assert_invariants(cache)


def test_store_slots_a_live_request_pins_are_protected_not_evictable():
    """SGLang admits a request when free + evictable covers it, then evicts: what a live
    request's decision pins cannot be evicted, so it must count as protected (the soak's
    scheduler crashed on "Out of memory ... available_size=22 + evictable_size=390")."""
    cache, ns = make_cache(), namespace()
    ids, hints = consumer_setup(cache, ns)
    req = Req(ids, ns, hints)
    cache.match_prefix(MatchPrefixParams(key=RadixKey(ids[:-1], ns), req=req))
    pinned = cache.runtime.pinned_tokens()
    assert pinned >= 3 + 5                              # message "q" and agent a's template
    allocator = cache.token_to_kv_pool_allocator
    promised = allocator.available_size() + cache.evictable_size()
    cache.evict(type("P", (), {"num_tokens": 10_000})())
    assert allocator.available_size() == promised      # eviction freed all it promised
    assert cache.protected_size() == pinned and pool_is_whole(cache)
    cache.after_batch([])                               # the request is gone: nothing pinned
    assert cache.runtime.pinned_tokens() == 0
