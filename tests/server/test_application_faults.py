"""Faults around shared applications, on SGLang's own CPU pools (found by a review, each test
failed before its fix): a save that fails while an idle application is dropped to make room
computes the request densely and leaks nothing; a dropped application's saved anchors come back
when it is named again (it was started cold and saved over); eviction passes over the anchors a
live request reads (evicting them freed nothing and emptied the pool for every later request)."""

import errno
import json

import torch

from kvcomm_sglang.protocol import Piece
from kvcomm_sglang.runtime_patch.persistence import AnchorPersistence
from tests.server.cpu_pools import Req, admit, make_cache, release
from tests.server.test_applications import (FINGERPRINT, GATE_OFF, LAYOUT, TEMPLATE, ask,
                                            namespace, question, secret, warm)


def _drop_workflows(runtime) -> None:
    for name in list(runtime.namespaces):
        runtime.drop_namespace(name)


def test_a_failed_save_while_making_room_computes_densely_and_leaks_nothing(tmp_path,
                                                                          monkeypatch):
    cache = make_cache(max_applications=1, namespace_idle_s=0.0, **GATE_OFF)
    runtime = cache.runtime
    runtime.persistence = AnchorPersistence(tmp_path, FINGERPRINT, runtime.config)
    warm(cache, secret())
    _drop_workflows(runtime)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    assert ask(cache, namespace(secret()), 0) == "dense"   # the idle one made room, unsaved
    runtime.persistence.flush()
    assert len(runtime.applications) == 1
    assert cache.checker.check() == []                      # its slots were swept all the same
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*.tmp"))


def test_an_error_while_finding_the_namespace_computes_densely(monkeypatch):
    cache = make_cache(**GATE_OFF)
    ns = namespace(secret())

    def broken(*args, **kwargs):
        raise RuntimeError("making room failed")
    monkeypatch.setattr(cache.runtime.namespaces, "get", broken)
    req = Req(TEMPLATE[0] + question(0) + TEMPLATE[1], ns, {"agent": "a", "layout": LAYOUT})
    admit(cache, req)                                       # not raised into the scheduler
    assert cache.runtime.decisions[req.rid].reason == "plan_error:RuntimeError"
    release(cache, req)
    monkeypatch.undo()
    assert cache.checker.check() == []


def test_a_dropped_application_comes_back_warm_and_its_file_is_not_saved_over(tmp_path):
    cache = make_cache(**GATE_OFF)
    runtime = cache.runtime
    runtime.persistence = AnchorPersistence(tmp_path, FINGERPRINT, runtime.config)
    app = secret()
    warm(cache, app)
    cache.after_batch([])                                   # idle: saved warm
    runtime.persistence.flush()
    saved = lambda: [json.loads(p.read_text())["anchors"] for p in tmp_path.glob("*.json")]  # noqa: E731
    assert saved() == [2]
    _drop_workflows(runtime)
    runtime.applications.drop(app)                          # as the application bound does
    ns = namespace(app)
    cache.after_batch([Req([1, 2, 3], ns)])                 # named again: restored
    assert runtime.applications.items[app].state.anchors.num_anchors == 2
    assert ask(cache, ns, 30) == "reuse"
    cache.after_batch([])
    runtime.persistence.flush()
    assert saved() == [2] and cache.checker.check() == []


def test_eviction_passes_over_the_anchors_a_live_request_reads():
    cache, app = make_cache(**GATE_OFF), secret()
    warm(cache, app, range(4))
    runtime = cache.runtime
    ns = namespace(app)
    ask(cache, ns, 5)
    layout = [LAYOUT[0], Piece("content", 3, "user_question", "q5"), LAYOUT[2]]
    req = Req(TEMPLATE[0] + question(5) + TEMPLATE[1], ns, {"agent": "a", "layout": layout})
    admit(cache, req)
    assert runtime.decisions[req.rid].kind == "reuse"
    application = runtime.applications.items[app]
    anchors = application.state.anchors.num_anchors
    runtime.namespaces.evict_within(application, 10**6)    # more room than it can give
    assert application.state.anchors.num_anchors == anchors   # every one is read by req
    assert cache.checker.check([req]) == []
    release(cache, req)
    assert cache.checker.check() == []


def test_finished_writes_are_not_kept(tmp_path):
    """Only writes in flight are remembered (restores wait for them): one entry per
    application ever saved grew without bound."""
    cache = make_cache(**GATE_OFF)
    runtime = cache.runtime
    runtime.persistence = AnchorPersistence(tmp_path, FINGERPRINT, runtime.config)
    for _ in range(3):
        warm(cache, secret())
        cache.after_batch([])                               # idle: each one saved
    runtime.persistence.flush()
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert runtime.persistence.writes == {}
