"""A long-lived workflow survives a server restart (real CPU servers, one port).

A two-role program (solver, then a checker that reads the solver's answer) shares one context
document across questions. It runs until the server reuses, the server stops, a new one starts
on the same port with empty state, and the same workflow continues: the first calls fall back
with ``unknown_template`` (the templates are gone: the endpoint sends them again; the solver's
dense call stores the context and question again), and reuse comes back within a few questions,
without one error.
"""

from urllib.parse import urlparse

import sglang as sgl

from kvcomm_sglang.frontend import KVCommEndpoint, use, workflow
from tests.harness.workflow import QUESTIONS
from tests.server import conftest as server_conftest
from tests.server.conftest import start_server

CONTEXT = "Answer as a patient math teacher would, in one short sentence with the final number."
BEFORE = QUESTIONS[:5]              # a fresh workflow: 2 questions fill the anchors, then reuse
# After the restart: one question finds the templates gone, one the context, two refill the
# anchors (long questions: an anchor vouches only for content no longer than itself), then reuse.
AFTER = tuple(QUESTIONS[i] for i in (4, 14, 22, 20, 5, 15))
MAX_QUESTIONS_AFTER = 5


@sgl.function
def solver(s, context, question):
    s += sgl.system("You are a careful solver.")
    s += sgl.user("Context:\n" + context + "\nTask:\n" + question + "\nAnswer briefly.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))


@sgl.function
def checker(s, context, question, answer):
    s += sgl.system("You are a strict checker.")
    s += sgl.user("Context:\n" + context + "\nTask:\n" + question + "\nEarlier answer:\n" +
                  answer + "\nIs it right?")
    s += sgl.assistant(sgl.gen("verdict", max_tokens=8, temperature=0))


def ask(endpoint, question: str) -> None:
    state = solver.run(context=CONTEXT, question=question, backend=endpoint)
    assert state.error() is None, state.error()
    state = checker.run(context=CONTEXT, question=question, answer=state["answer"],
                        backend=endpoint)
    state.sync()
    assert state.error() is None, state.error()


def ask_until_reuse(endpoint, wf, questions) -> list:
    """Questions in ``wf`` until a call is reused; -> the calls they made."""
    first = len(wf.calls)
    with use(wf):
        for question in questions:
            ask(endpoint, question)
            if any(c.mode == "reuse" for c in wf.calls[first:]):
                break
    return wf.calls[first:]


def summary(calls) -> list:
    return [(c.role, c.mode, c.fallback_reason) for c in calls]


def test_a_workflow_reuses_again_after_a_server_restart(tmp_path_factory, monkeypatch):
    server = start_server(tmp_path_factory, "kvcomm")
    try:
        endpoint = KVCommEndpoint(server.url)
        with workflow("long-lived") as wf:
            pass
        before = ask_until_reuse(endpoint, wf, BEFORE)
        assert any(c.mode == "reuse" for c in before), summary(before)
    finally:
        server.stop()
    port = urlparse(server.url).port       # start_server takes a free port: hand it the old one
    monkeypatch.setattr(server_conftest, "_free_port", lambda: port)
    server = start_server(tmp_path_factory, "kvcomm")
    try:
        assert urlparse(server.url).port == port
        after = ask_until_reuse(endpoint, wf, AFTER)
    finally:
        server.stop()
    assert [c.fallback_reason for c in after[:2]] == ["unknown_template"] * 2, summary(after)
    # the first calls found the templates gone; the solver's dense call stored the context and
    # the question again, so from then on only each new question is unknown, in the solver's
    # call that computes it first
    assert all(c.role == 0 for c in after[2:] if c.fallback_reason == "unknown_message"), \
        summary(after)
    assert not any(c.fallback_reason == "unknown_template" for c in after[2:]), summary(after)
    reused = [i for i, c in enumerate(after) if c.mode == "reuse"]
    assert reused and reused[0] < 2 * MAX_QUESTIONS_AFTER, summary(after)
    assert all(c.mode == "dense" for c in after[:reused[0]]), summary(after)
    assert 0 < after[reused[0]].reused_tokens < after[reused[0]].prompt_tokens
