"""A message's base KV comes from the dense prefill that first computes it (issue 15 item 2): a
workflow sends no separate base request. On SGLang's own CPU pools, no server."""

import torch

from kvcomm_sglang.protocol import Piece
from kvcomm_sglang.rope import rotate
from tests.server.cpu_pools import FINISH_ABORT, Req, admit, make_cache, namespace, release, serve

LAYOUT = [Piece("template", 3), Piece("content", 3, "user_question", "q"),
          Piece("template", 2)]
CALL = {"agent": "a", "layout": LAYOUT}


def template_pass(cache, ns):
    serve(cache, [1, 2, 3, 50, 51, 52, 4, 5], ns, {**CALL, "template": True})


def pool_kv(cache, req, start, end):
    slots = cache.req_to_token_pool.req_to_token[req.req_pool_idx, start:end].long()
    pool = cache.runtime.pool
    return (torch.stack([buf[slots] for buf in pool.k_buffer]),
            torch.stack([buf[slots] for buf in pool.v_buffer]))


def test_the_first_dense_call_holding_a_message_stores_its_exact_kv_as_the_base():
    cache, ns = make_cache(), namespace()
    template_pass(cache, ns)
    ids = [1, 2, 3, 60, 61, 62, 4, 5]
    req = Req(ids, ns, CALL)
    admit(cache, req)
    assert cache.runtime.decisions[req.rid].reason == "unknown_message"
    k, v = pool_kv(cache, req, 3, 6)                   # the question as this prefill computed it
    release(cache, req)
    space = cache.runtime.namespace(ns)
    content = space.state.contents[space.messages["q"]]
    assert content.token_ids == (60, 61, 62)
    positions = torch.arange(3, 6)
    torch.testing.assert_close(content.kv.k, rotate(k, -positions, cache.runtime.rope))
    torch.testing.assert_close(content.kv.v, v)
    assert cache.checker.check(()) == []


def test_the_next_call_plans_with_it_instead_of_falling_back_again():
    cache, ns = make_cache(), namespace()
    template_pass(cache, ns)
    serve(cache, [1, 2, 3, 60, 61, 62, 4, 5], ns, CALL)
    req = serve(cache, [1, 2, 3, 60, 61, 62, 4, 5], ns, CALL)
    assert req.customized_info["kvcomm"][0]["fallback_reason"] != "unknown_message"


def test_a_held_message_is_not_replaced_and_a_mismatch_is_not_stored():
    cache, ns = make_cache(), namespace()
    template_pass(cache, ns)
    serve(cache, [1, 2, 3, 60, 61, 62, 4, 5], ns, CALL)
    space = cache.runtime.namespace(ns)
    key, version = space.messages["q"], space.version
    req = serve(cache, [1, 2, 3, 70, 71, 72, 4, 5], ns, CALL)     # other tokens, same id
    assert req.customized_info["kvcomm"][0]["fallback_reason"] == "message_mismatch"
    assert space.messages["q"] == key and space.version == version
    assert space.state.contents[key].token_ids == (60, 61, 62)


def test_unknown_template_still_stores_the_message_and_empty_pieces_are_skipped():
    cache, ns = make_cache(), namespace()
    serve(cache, [1, 2, 3, 60, 61, 62, 4, 5], ns, CALL)          # no template pass yet
    space = cache.runtime.namespace(ns)
    assert space.state.contents[space.messages["q"]].token_ids == (60, 61, 62)
    empty = [Piece("template", 3), Piece("content", 0, "user_question", "e"),
             Piece("template", 2)]
    serve(cache, [1, 2, 3, 4, 5], ns, {"agent": "a", "layout": empty})
    assert "e" not in space.messages
    assert cache.checker.check(()) == []


def test_an_aborted_call_stores_nothing():
    cache, ns = make_cache(), namespace()
    template_pass(cache, ns)
    req = Req([1, 2, 3, 60, 61, 62, 4, 5], ns, CALL)
    admit(cache, req)
    release(cache, req, finished=FINISH_ABORT)
    assert "q" not in cache.runtime.namespace(ns).messages


def test_a_piece_the_store_cannot_hold_is_skipped_and_the_answer_still_captured():
    cache = make_cache(size=128, store_budget_fraction=0.25, namespace_quota_fraction=1.0)
    ns = namespace()
    template_pass(cache, ns)                                      # store: 32 tokens
    long = [Piece("template", 3), Piece("content", 40, "user_question", "q"),
            Piece("template", 2)]
    ids = [1, 2, 3] + list(range(60, 100)) + [4, 5]
    serve(cache, ids, ns, {"agent": "a", "layout": long,
                           "capture": ("ans", "agent_a_current")})
    space = cache.runtime.namespace(ns)
    assert "q" not in space.messages and "ans" in space.messages
    assert cache.runtime.stats.fallbacks["store_full"] == 1
    assert cache.runtime.stats.fallbacks["capture_error"] == 0
    assert cache.checker.check(()) == []


def test_the_same_tokens_under_another_message_id_share_the_stored_content():
    cache, ns = make_cache(), namespace()
    template_pass(cache, ns)
    serve(cache, [1, 2, 3, 60, 61, 62, 4, 5], ns, CALL)
    space = cache.runtime.namespace(ns)
    key = space.messages["q"]
    content, blocks = space.state.contents[key], cache.runtime.store.tokens
    other = [Piece("template", 3), Piece("content", 3, "user_question", "q2"),
             Piece("template", 2)]
    serve(cache, [1, 2, 3, 60, 61, 62, 4, 5], ns, {"agent": "a", "layout": other})
    assert space.messages["q2"] == key and space.state.contents[key] is content
    assert cache.runtime.store.tokens == blocks                   # nothing stored again
    assert cache.checker.check(()) == []


def test_a_layout_that_no_longer_spans_the_prompt_stores_no_piece_but_the_answer():
    """The scheduler may truncate a prompt after the edge checked its layout
    (--allow-auto-truncate): the pieces' spans are then unknown."""
    cache, ns = make_cache(), namespace()
    template_pass(cache, ns)
    req = Req([1, 2, 3, 60, 61, 62, 4, 5], ns, {**CALL, "capture": ("ans", "agent_a_current")},
              output_ids=(7, 8, 9))
    req.origin_input_ids = req.origin_input_ids[:7]              # truncated after validation
    admit(cache, req)
    release(cache, req)
    space = cache.runtime.namespace(ns)
    assert "q" not in space.messages and "ans" in space.messages
    assert cache.runtime.stats.fallbacks["capture_error"] == 0
