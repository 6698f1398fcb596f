"""The faithful (official, absolute-frame) mode reuses in the server: ``{"faithful": true}`` used
to end every reused call in ``materialize_error`` (the kernels read the position-0 frame only).
On SGLang's own CPU pools (no server): two dense calls teach the anchors, the third is reused,
and the slots it was given hold exactly the core's assembly of the prompt, in both frames."""

import pytest
import torch

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.protocol import Piece
from tests.server.cpu_pools import Req, admit, make_cache, namespace, release, serve

FAITHFUL = {f: getattr(KVCommConfig.faithful(), f) for f in
            ("derotated_storage", "distance_dtype", "top_p_credit", "strict_pool_size",
             "evict_on_delta_update")}


def layout(message=None, template=False):
    content = Piece("content", 3, "user_question", "standin" if template else message)
    return {"agent": "a", "layout": [Piece("template", 3), content, Piece("template", 2)],
            **({"template": True} if template else {})}


def consumer(question: int) -> list[int]:
    return [1, 2, 3, 60 + 3 * question, 61 + 3 * question, 62 + 3 * question, 4, 5]


@pytest.mark.parametrize("frame", ["absolute", "derotated"])
def test_the_third_call_is_reused_and_gets_the_core_assembly(frame):
    config = {"gamma": 1.0, **(FAITHFUL if frame == "absolute" else {})}
    cache, ns = make_cache(**config), namespace()
    runtime = cache.runtime
    assert runtime.config.derotated_storage == (frame == "derotated")
    serve(cache, [1, 2, 3, 50, 51, 52, 4, 5], ns, layout(template=True))
    for q in range(3):
        serve(cache, [90] + consumer(q)[3:6], ns, {"base": (f"q{q}", "user_question", 1)})
        if q < 2:                                   # dense: too few anchors, learned
            serve(cache, consumer(q), ns, layout(f"q{q}"))
    assert runtime.stats.fallbacks["new_anchor"] == 2
    req = Req(consumer(2), ns, layout("q2"))
    prefix = admit(cache, req)
    decision = runtime.decisions[req.rid]
    assert decision.kind == "reuse" and prefix == 7, (decision.kind, decision.reason)
    space = runtime.namespace(ns)
    plan = space.state.plan(decision.template, decision.keys)   # deterministic: the same plan
    k, v = space.state.assemble(decision.template, decision.keys, plan)
    slots = cache.req_to_token_pool.req_to_token[req.req_pool_idx, :7].to(torch.int64)
    for layer in range(k.shape[0]):
        torch.testing.assert_close(runtime.pool.k_buffer[layer][slots], k[layer, :7])
        torch.testing.assert_close(runtime.pool.v_buffer[layer][slots], v[layer, :7])
    release(cache, req)
    assert not any(r.startswith("materialize_error") for r in runtime.stats.fallbacks)
    assert cache.checker.check([]) == []

