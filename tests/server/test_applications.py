"""Applications on SGLang's own CPU pools (no server): workflows of one application share its
templates and anchors, so a new workflow reuses from its first call; applications never share
with each other; their blocks have one owner and obey the quotas and bounds; and a saved
application comes back in a fresh runtime (``--kvcomm-anchor-path``), refused when the model or
a template does not match. The invariant checker runs after every step."""

import logging
import secrets

import pytest
import torch

from kvcomm_sglang.protocol import Piece
from kvcomm_sglang.runtime_patch.persistence import AnchorPersistence
from tests.server.cpu_pools import Req, admit, make_cache, pool_is_whole, release, serve

GATE_OFF = {"gamma": 1.0}            # random KV: the entropy gate would call every content new
TEMPLATE = [1, 2, 3], [4, 5]         # x0, x1 around the question
LAYOUT = [Piece("template", 3), Piece("content", 3, "user_question", "q"), Piece("template", 2)]
FINGERPRINT = {"model": "m1", "tokenizer": "t1", "kv": "2x2x8", "rope": "r1",
               "storage": "derotated"}


def secret() -> str:
    return secrets.token_urlsafe(16)


def namespace(app: str | None = None) -> str:
    return f"kvcomm:{app}.{secret()}" if app else f"kvcomm:{secret()}"


def question(i: int) -> list[int]:
    return [60 + 3 * i, 61 + 3 * i, 62 + 3 * i]


def ask(cache, ns, i: int) -> str:
    """Question i in workflow ``ns``: the template pass, its base request, the agent's call;
    -> how the call was served ("reuse" | "dense")."""
    serve(cache, TEMPLATE[0] + [50, 51, 52] + TEMPLATE[1], ns,
          {"agent": "a", "layout": LAYOUT, "template": True})
    serve(cache, [90] + question(i), ns, {"base": (f"q{i}", "user_question", 1)})
    layout = [LAYOUT[0], Piece("content", 3, "user_question", f"q{i}"), LAYOUT[2]]
    req = serve(cache, TEMPLATE[0] + question(i) + TEMPLATE[1], ns,
                {"agent": "a", "layout": layout})
    assert cache.checker.check() == []
    return req.customized_info["kvcomm"][0]["mode"]


def warm(cache, app: str, questions=range(3)) -> None:
    """One workflow of ``app`` until its anchors vouch for new questions."""
    ns = namespace(app)
    assert [ask(cache, ns, i) for i in questions][:2] == ["dense", "dense"]


# ---- sharing ----
def test_a_new_workflow_of_a_warm_application_reuses_from_its_first_call():
    cache, app = make_cache(**GATE_OFF), secret()
    warm(cache, app)
    runtime = cache.runtime
    (state,) = [a.state for a in runtime.applications.values()]
    store_before = runtime.store.tokens
    firsts = [ask(cache, namespace(app), 10 + i) for i in range(4)]
    assert firsts == ["reuse"] * 4
    assert len(state.templates) == 1                 # the new workflows' passes added nothing
    assert runtime.store.usage[runtime.applications.values()[0].owner] <= store_before
    assert len(runtime.applications) == 1 and len(runtime.namespaces) == 5


def test_applications_never_share_templates_or_anchors():
    cache, app = make_cache(**GATE_OFF), secret()
    warm(cache, app)
    assert ask(cache, namespace(secret()), 10) == "dense"       # another application: cold
    assert ask(cache, namespace(), 11) == "dense"               # no application: its own
    anchors = {a.key: a.state.anchors.num_anchors for a in cache.runtime.applications.values()}
    assert anchors.pop(app) == 2 and list(anchors.values()) == [1, 1]   # each its own call
    owners = set(cache.runtime.store.ledger)
    assert all(o.startswith(("kvcomm:", "app:")) for o in owners)


def test_a_workflows_blocks_and_its_applications_have_one_owner_each():
    cache, app = make_cache(**GATE_OFF), secret()
    warm(cache, app)
    runtime = cache.runtime
    (application,) = runtime.applications.values()
    (ns,) = runtime.namespaces.values()
    ledger = runtime.store.ledger
    assert application.reachable() == set(ledger[application.owner])   # templates, anchors
    assert ns.reachable() == set(ledger[ns.name])                       # messages only
    runtime.drop_namespace(ns.name)                  # the workflow ends: the application stays
    assert app in runtime.applications and ns.name not in ledger
    assert ask(cache, namespace(app), 20) == "reuse"
    for name in list(runtime.namespaces):
        runtime.drop_namespace(name)
    runtime.applications.drop(app)
    assert runtime.store.tokens == 0 and pool_is_whole(cache)
    assert cache.checker.check() == []


def test_an_application_of_its_own_goes_with_its_workflow():
    cache = make_cache(**GATE_OFF)
    ns = namespace()
    ask(cache, ns, 0)
    assert len(cache.runtime.applications) == 1
    cache.runtime.drop_namespace(ns)
    assert len(cache.runtime.applications) == 0 and cache.runtime.store.tokens == 0
    assert cache.checker.check() == []


def test_an_application_over_its_quota_evicts_only_its_own_anchors():
    cache = make_cache(size=1024, store_budget_fraction=0.125, namespace_quota_fraction=0.25,
                       min_anchors=50, **GATE_OFF)   # store 128 tokens, quota 32 per owner;
    app, other = secret(), namespace()               # every call dense: every call an anchor
    ask(cache, other, 0)
    quiet = cache.runtime.namespaces[other]
    ns = namespace(app)
    assert {ask(cache, ns, i) for i in range(8)} == {"dense"}    # 8 tokens an anchor
    runtime = cache.runtime
    application = runtime.applications.items[app]
    assert runtime.store.usage[application.owner] <= runtime.store.quota_tokens
    assert 0 < application.state.anchors.num_anchors < 8 and application.state.templates
    assert "q0" in quiet.messages and quiet.app.state.templates   # the other holder kept all
    assert cache.checker.check() == []


def test_new_applications_never_replace_ones_in_use():
    cache = make_cache(max_applications=1, **GATE_OFF)
    app = secret()
    ask(cache, namespace(app), 0)
    req = Req(TEMPLATE[0] + question(0) + TEMPLATE[1], namespace(secret()),
              {"agent": "a", "layout": LAYOUT})
    admit(cache, req)
    assert cache.runtime.decisions[req.rid].reason == "namespace_limit"
    release(cache, req)
    assert list(cache.runtime.applications.items) == [app]
    assert cache.checker.check() == []


def test_a_dropped_workflows_pinned_blocks_are_freed_when_its_request_ends():
    cache, app = make_cache(**GATE_OFF), secret()
    warm(cache, app)
    ns = namespace(app)
    ask(cache, ns, 5)
    layout = [LAYOUT[0], Piece("content", 3, "user_question", "q5"), LAYOUT[2]]
    req = Req(TEMPLATE[0] + question(5) + TEMPLATE[1], ns, {"agent": "a", "layout": layout})
    admit(cache, req)                                # live: it pins message q5
    cache.runtime.drop_namespace(ns)
    assert cache.runtime.store.ledger.get(ns)        # pinned blocks outlive the drop
    assert cache.checker.check([req]) == []
    release(cache, req)
    assert ns not in cache.runtime.store.ledger
    assert cache.checker.check() == []


# ---- across restarts ----
def saved(tmp_path, app: str, fingerprint=FINGERPRINT):
    """A warm application saved to ``tmp_path`` by one runtime."""
    cache = make_cache(**GATE_OFF)
    cache.runtime.persistence = AnchorPersistence(tmp_path, fingerprint, cache.runtime.config)
    warm(cache, app)
    cache.after_batch([])                            # idle: changed applications are saved
    cache.runtime.persistence.flush()                # (written on the writer thread)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert app not in "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.json"))
    return cache


def restarted(tmp_path, fingerprint=FINGERPRINT):
    cache = make_cache(**GATE_OFF)
    cache.runtime.persistence = AnchorPersistence(tmp_path, fingerprint, cache.runtime.config)
    return cache


def first_call(cache, app: str) -> str:
    """A new workflow's first question, after the scheduler hook saw its requests arrive."""
    ns = namespace(app)
    cache.after_batch([Req([1, 2, 3], ns)])
    return ask(cache, ns, 30)


def test_a_saved_application_reuses_from_the_first_workflow_after_a_restart(tmp_path):
    app = secret()
    before = saved(tmp_path, app).runtime.applications.items[app].state
    cache = restarted(tmp_path)
    assert first_call(cache, app) == "reuse"
    after = cache.runtime.applications.items[app].state
    assert list(after.templates) == list(before.templates)
    assert after.anchors.num_anchors == before.anchors.num_anchors
    assert cache.checker.check() == []
    assert first_call(restarted(tmp_path), secret()) == "dense"    # others stay cold


def test_an_application_saved_for_another_model_is_refused_with_the_reason(tmp_path, caplog):
    app = secret()
    saved(tmp_path, app)
    with caplog.at_level(logging.ERROR):
        cache = restarted(tmp_path, {**FINGERPRINT, "model": "m2"})
    assert "saved under another model m1 (saved) != m2 (served)" in caplog.text
    assert "starts cold" in caplog.text
    assert first_call(cache, app) == "dense"
    assert cache.runtime.applications.items[app].state.anchors.num_anchors == 1  # its own call


def test_a_template_whose_tokens_do_not_match_its_key_is_refused(tmp_path, caplog):
    app = secret()
    saved(tmp_path, app)
    (path,) = tmp_path.glob("*.pt")
    data = torch.load(path, weights_only=True)
    data["templates"][0]["piece_ids"][0][0] += 1     # its tokens no longer hash to its key
    torch.save(data, path)
    cache = restarted(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert first_call(cache, app) == "dense"
    assert "hash to" in caplog.text and "not to its key" in caplog.text
    state = cache.runtime.applications.items[app].state
    assert state.anchors.num_anchors == 1            # its own call's: none under the refused one
    assert cache.checker.check() == []


@pytest.mark.parametrize("busy", [False, True])
def test_changed_applications_are_saved_when_idle_or_every_interval(tmp_path, busy):
    cache = make_cache(anchor_save_interval_s=0.0 if busy else 3600.0, **GATE_OFF)
    cache.runtime.persistence = AnchorPersistence(tmp_path, FINGERPRINT, cache.runtime.config)
    ns = namespace(secret())
    ask(cache, ns, 0)
    cache.after_batch([Req([1], ns)])                # a request is live
    cache.runtime.persistence.flush()
    assert bool(list(tmp_path.glob("*.pt"))) == busy
    cache.after_batch([])
    cache.runtime.persistence.flush()
    assert list(tmp_path.glob("*.pt"))
