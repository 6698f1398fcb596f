"""Who gives room when the segment store is full (docs/isolation.md, "Bounds"), on SGLang's own
CPU pools: the workflows that finished (their messages are read by nobody again) before the
application's templates and anchors, which every new workflow of it needs. Under the previous
rule (the largest holder first) a warm application was the largest holder, lost its anchors to
make room for finished workflows' messages, and new workflows fell back to dense: reuse collapsed
as workflows piled up."""

import pytest

from kvcomm_sglang.protocol import Piece
from tests.server.cpu_pools import Req, admit, make_cache, release, serve
from tests.server.test_applications import GATE_OFF, LAYOUT, TEMPLATE, ask, namespace, question, \
    secret, warm


def other_workflow(cache, app: str, i: int) -> None:
    """A new workflow of ``app`` asks question i (its template pass, base request and call)."""
    ns = namespace(app)
    serve(cache, TEMPLATE[0] + [50, 51, 52] + TEMPLATE[1], ns,
          {"agent": "a", "layout": LAYOUT, "template": True})
    serve(cache, [90] + question(i), ns, {"base": (f"q{i}", "user_question", 1)})
    layout = [LAYOUT[0], Piece("content", 3, "user_question", f"q{i}"), LAYOUT[2]]
    serve(cache, TEMPLATE[0] + question(i) + TEMPLATE[1], ns, {"agent": "a", "layout": layout})


@pytest.mark.parametrize("budget", [0.05, 0.0625])       # 51 and 64 store tokens
def test_finished_workflows_give_room_before_the_application_they_warmed(budget):
    cache, app = make_cache(size=1024, store_budget_fraction=budget, **GATE_OFF), secret()
    warm(cache, app)
    runtime = cache.runtime
    application = runtime.applications.items[app]
    anchors = application.state.anchors.num_anchors
    modes = [ask(cache, namespace(app), 10 + i) for i in range(16)]
    assert modes == ["reuse"] * 16                       # each a new workflow, each reused
    assert application.state.anchors.num_anchors == anchors and application.state.templates
    assert runtime.store.tokens <= runtime.store.max_tokens
    assert cache.checker.check() == []


def test_a_live_workflows_message_is_never_given_up_for_room():
    cache, app = make_cache(size=1024, store_budget_fraction=0.05, **GATE_OFF), secret()
    warm(cache, app)
    ns = namespace(app)
    ask(cache, ns, 40)
    layout = [LAYOUT[0], Piece("content", 3, "user_question", "q40"), LAYOUT[2]]
    req = Req(TEMPLATE[0] + question(40) + TEMPLATE[1], ns, {"agent": "a", "layout": layout})
    admit(cache, req)                                    # live: pins its message q40
    assert cache.runtime.decisions[req.rid].kind == "reuse"
    for i in range(16):                                  # other workflows need the room
        other_workflow(cache, app, 50 + i)
        assert cache.checker.check([req]) == []
    assert "q40" in cache.runtime.namespaces[ns].messages
    assert cache.checker.check([req]) == []
    release(cache, req)
    assert cache.checker.check() == []
