"""A forked @sgl.function through KVCommEndpoint: three roles fork after a shared question, a judge
reads their answers behind its own prompt. The judge's call is served by reuse after warm-up
(the forks share one role prefix: their answers are named per producing agent), and its verdict
is compared with a dense prefill of the same prompt.

The server runs with the entropy gate off (gamma 1.0, as the timing runs): this tests how a
forked program's messages reach the judge, not the gate. With the default gamma 0.3 the judge's
four contents must each pass the gate, and short answers (early EOS, 4-9 tokens) have few anchors
at least as long; measured with the forks computed densely (no base request: the question's KV
comes from the first fork), 0 of 10 judge calls passed at gamma 0.3, 7 of 10 at gamma 1.0 (5 of
7 verdicts equal to dense). The gate's effect on reuse and agreement is measured on the same
calls by benchmarks/agreement.py."""

import json

import pytest
import sglang as sgl

from kvcomm_sglang.frontend import KVCommEndpoint, workflow
from kvcomm_sglang.runtime_patch import launch
from tests.harness.workflow import QUESTIONS
from tests.server.conftest import start_server

NUM_QUESTIONS = 10
ROLES = ("Answer as a careful solver, step by step.",
         "Answer as a skeptic who double-checks the numbers.",
         "Answer as a teacher who explains simply.")


@sgl.function
def panel(s, question):
    s += sgl.system("You are a panel of math experts.")
    s += sgl.user("Task:\n" + question)
    forks = s.fork(len(ROLES))
    for fork, role in zip(forks, ROLES):
        fork += sgl.user(role)
        fork += sgl.assistant(sgl.gen("answer", max_tokens=16, temperature=0))
    forks.join()
    answers = "".join(f"\nAnswer {i + 1}:\n{fork['answer']}\n" for i, fork in enumerate(forks))
    s += sgl.user("Judge these answers." + answers + "\nWhich answer is right?")
    s += sgl.assistant(sgl.gen("verdict", max_tokens=12, temperature=0))


@sgl.function
def judge_again(s, question, text):
    """The judge's exact prompt text once more (dense mode sends the same token ids, no hints)."""
    s += sgl.system("You are a panel of math experts.")
    s += sgl.user("Task:\n" + question)
    s += sgl.user(text)
    s += sgl.assistant(sgl.gen("verdict", max_tokens=12, temperature=0))


@pytest.fixture(scope="module")
def gate_off_server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVCOMM_CONFIG", json.dumps({"gamma": 1.0}))
        server = start_server(tmp_path_factory, launch.BACKEND_NAME)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def panel_runs(gate_off_server):
    endpoint = KVCommEndpoint(gate_off_server.url)
    runs = []
    with workflow("panel") as wf:
        for question in QUESTIONS[:NUM_QUESTIONS]:
            state = panel.run(question=question, backend=endpoint)
            state.sync()
            assert state.error() is None, state.error()
            runs.append((question, state))
    return endpoint, wf, runs


def test_the_judge_of_a_forked_program_is_served_by_reuse(panel_runs):
    _, wf, runs = panel_runs
    judges = wf.calls[len(ROLES)::len(ROLES) + 1]
    assert len(judges) == NUM_QUESTIONS
    assert not any((c.fallback_reason or "").startswith("client:") for c in wf.calls), \
        [(c.agent, c.mode, c.fallback_reason) for c in wf.calls]
    assert len({c.agent for c in judges}) == 1 and len({c.agent for c in wf.calls}) == 4
    reused = [c for c in judges if c.mode == "reuse"]
    assert reused, [(c.agent, c.mode, c.fallback_reason) for c in judges]
    for call in reused:           # the question and the three answers, not just a prefix
        assert call.reused_tokens > call.prompt_tokens // 2


def test_reused_judge_verdicts_agree_with_dense(panel_runs):
    endpoint, wf, runs = panel_runs
    judges = wf.calls[len(ROLES)::len(ROLES) + 1]
    agree = []
    with workflow("panel-dense", mode="dense"):
        for (question, state), call in zip(runs, judges):
            if call.mode != "reuse":
                continue
            judge_text = state.messages()[-2]["content"]
            dense = judge_again.run(question=question, text=judge_text, backend=endpoint)
            agree.append(dense["verdict"].split()[:1] == state["verdict"].split()[:1])
    print(f"reused judge calls whose first word equals dense: {sum(agree)}/{len(agree)}")
    assert agree and sum(agree) >= len(agree) / 2
