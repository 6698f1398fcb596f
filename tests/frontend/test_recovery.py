"""The endpoint recovers when the server forgets a workflow (no server: a scripted one).

A call answered with ``unknown_template`` makes the endpoint register that agent's template
again before its next call; ``unknown_message`` needs nothing (the server stored the message
again from that dense call), and no message is ever sent on its own. The endpoint never raises
on either.
"""

import pytest
import sglang as sgl
from sglang.lang.chat_template import get_chat_template

from kvcomm_sglang import protocol
from kvcomm_sglang.frontend import KVCommEndpoint, use, workflow
from kvcomm_sglang.frontend.endpoint import _load_tokenizer
from kvcomm_sglang.models import default_model_dir

QUESTIONS = ["How many legs do three spiders have in total?",
             "What is the sum of seventeen and twenty five?"]
ANSWER = "Spiders have eight legs each, so the total is twenty four."


@sgl.function
def solver(s, question):
    s += sgl.system("You are a careful solver.")
    s += sgl.user("Task:\n" + question + "\nAnswer briefly.")
    s += sgl.assistant(sgl.gen("answer", temperature=0))


@sgl.function
def checker(s, question, answer):
    s += sgl.system("You are a strict checker.")
    s += sgl.user("Task:\n" + question + "\nEarlier answer:\n" + answer + "\nIs it right?")
    s += sgl.assistant(sgl.gen("verdict", temperature=0))


class ScriptedServer:
    """Stands in for ``KVCommEndpoint._post``: records every request as (kind, hints, ids) and
    answers each gen call with the next scripted fallback reason (None: reused)."""

    def __init__(self, endpoint):
        self.endpoint, self.requests, self.reasons = endpoint, [], []

    def post(self, ids, params, hints, namespace, stream=False):
        decoded = protocol.decode(hints)
        kind = "template" if decoded.template else "base" if decoded.base else "gen"
        self.requests.append((kind, decoded, list(ids)))
        if kind != "gen":
            return 0.01, "x", [1, 2], {"kvcomm": [{"mode": "dense", "fallback_reason": None}]}
        reason = self.reasons.pop(0) if self.reasons else None
        answer = list(self.endpoint.tokenize(ANSWER)) + [2]
        report = {"mode": "dense" if reason else "reuse", "reused_tokens": 0 if reason else 5,
                  "fallback_reason": reason}
        return 0.01, ANSWER, answer, {"kvcomm": [report], "finish_reason": {"type": "stop"}}

    def take(self) -> list:
        """The requests since the last take, as (kind, agent or message id)."""
        out = [(kind, h.agent if kind == "template" else h.base[0] if kind == "base"
                else h.agent) for kind, h, _ in self.requests]
        self.requests.clear()
        return out


@pytest.fixture
def server(monkeypatch):
    endpoint = KVCommEndpoint.__new__(KVCommEndpoint)     # no HTTP: the scripted server answers
    endpoint.base_url, endpoint.api_key, endpoint.timeout = "http://127.0.0.1:9", None, 10
    endpoint._tokenizer = _load_tokenizer(str(default_model_dir()))
    endpoint.chat_template = get_chat_template("chatml")
    endpoint._checked_backend = True
    scripted = ScriptedServer(endpoint)
    monkeypatch.setattr(endpoint, "_post", scripted.post)
    return scripted


def run(program, **kwargs):
    state = program.run(backend=kwargs.pop("backend"), **kwargs)
    state.sync()
    assert state.error() is None, state.error()       # the endpoint never raises on these
    return state


def test_unknown_template_registers_the_agent_again_before_its_next_call(server):
    backend = server.endpoint
    with workflow("recover") as wf:
        run(solver, question=QUESTIONS[0], backend=backend)
        assert server.take() == [("template", "0"), ("gen", "0")]
        server.reasons = ["unknown_template"]
        run(solver, question=QUESTIONS[0], backend=backend)
        assert server.take() == [("gen", "0")]
    assert wf.calls[-1].fallback_reason == "unknown_template"
    with use(wf):
        run(solver, question=QUESTIONS[1], backend=backend)
        kinds = server.take()
        assert kinds[0] == ("template", "0") and kinds[-1] == ("gen", "0")
        run(solver, question=QUESTIONS[0], backend=backend)
        assert server.take() == [("gen", "0")]      # registered again once, not every call


def test_no_message_is_sent_on_its_own_not_even_after_unknown_message(server):
    """The server keeps a message's KV from the first dense call that computes it (the question
    inside the solver's prompt, the answer from its generation), and stores it again from the
    dense call that reported ``unknown_message``: the endpoint sends no base request."""
    backend = server.endpoint
    with workflow("recover") as wf:
        answer = run(solver, question=QUESTIONS[0], backend=backend)["answer"]
        run(checker, question=QUESTIONS[0], answer=answer, backend=backend)
        produced = wf.produced[0]                  # the solver's answer, captured as m2
        assert produced.role == 0 and produced.text == answer
        assert server.take() == [("template", "0"), ("gen", "0"), ("template", "1"), ("gen", "1")]
        server.reasons = ["unknown_message"]
        run(checker, question=QUESTIONS[0], answer=answer, backend=backend)
        assert wf.calls[-1].fallback_reason == "unknown_message"
        run(checker, question=QUESTIONS[0], answer=answer, backend=backend)
        assert server.take() == [("gen", "1"), ("gen", "1")]


def test_other_fallbacks_send_nothing_again(server):
    backend = server.endpoint
    with workflow("recover"):
        run(solver, question=QUESTIONS[0], backend=backend)
        server.take()
        server.reasons = ["new_anchor", "plan_error:RuntimeError", "quota"]
        for _ in range(4):
            run(solver, question=QUESTIONS[0], backend=backend)
        assert server.take() == [("gen", "0")] * 4
