"""KVCommEndpoint against the real CPU kvcomm server: an unchanged @sgl.function program gets
reuse for the consumer role after warm-up; fork/select/run_batch still work; misuse errors."""

import pytest
import sglang as sgl

from kvcomm_sglang.frontend import KVCommEndpoint, workflow
from tests.harness.workflow import QUESTIONS

NUM_QUESTIONS = 4


@sgl.function
def solver(s, question):
    s += sgl.system("You are a careful solver. Answer in one short sentence.")
    s += sgl.user("Task:\n" + question + "\nAnswer briefly.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))


@sgl.function
def checker(s, question, answer):
    s += sgl.system("You are a strict checker. Check the earlier answer.")
    s += sgl.user("Task:\n" + question + "\nEarlier answer:\n" + answer + "\nIs it right?")
    s += sgl.assistant(sgl.gen("verdict", max_tokens=12, temperature=0))


@pytest.fixture(scope="module")
def endpoint(kvcomm_server):
    return KVCommEndpoint(kvcomm_server.url)


@pytest.fixture(scope="module")
def two_role_runs(endpoint):
    sgl.set_default_backend(endpoint)
    with workflow("two-roles") as wf:
        for q in QUESTIONS[:NUM_QUESTIONS]:
            answer = solver.run(question=q)["answer"]
            checker.run(question=q, answer=answer).sync()
    with workflow("two-roles-dense", mode="dense") as dense:
        for q in QUESTIONS[:2]:
            answer = solver.run(question=q)["answer"]
            state = checker.run(question=q, answer=answer)
            state.sync()
            assert state.error() is None, state.error()
    return wf, dense


def test_consumer_role_is_served_by_reuse_after_warmup(two_role_runs):
    wf, _ = two_role_runs
    checker_calls = [c for c in wf.calls if c.role == 1]
    assert len(checker_calls) == NUM_QUESTIONS
    assert all(c.mode == "dense" for c in checker_calls[:2])
    assert all(c.fallback_reason.startswith("new_anchor") for c in checker_calls[:2])
    reused = [c for c in wf.calls[4:] if c.mode == "reuse"]
    assert any(c.role == 1 for c in reused), [(c.role, c.mode, c.fallback_reason) for c in wf.calls]
    for call in reused:
        assert 0 < call.reused_tokens < call.prompt_tokens and call.ttft_s > 0


def test_messages_are_spliced_with_the_captured_ids(two_role_runs):
    wf, dense = two_role_runs
    assert all(c.message is not None for c in wf.calls)      # every answer became a message
    assert any(m.role == 0 for m in wf.messages.values())
    assert [c.prompt_tokens for c in wf.calls[:4]] == [c.prompt_tokens for c in dense.calls]
    assert all(c.mode == "dense" and c.fallback_reason is None for c in dense.calls)
    assert [c.text for c in wf.calls[:4]] == [c.text for c in dense.calls]   # warm-up is exact


def test_outside_a_workflow_it_is_a_plain_runtime_endpoint(endpoint):
    state = solver.run(question=QUESTIONS[0], backend=endpoint)
    assert state["answer"] and "kvcomm_call" not in state.get_meta_info("answer")
    assert endpoint.support_concate_and_append is False


@sgl.function
def fork_and_select(s, question):
    s += sgl.user("Task:\n" + question)
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += sgl.assistant(sgl.gen("idea", max_tokens=6, temperature=0))
    forks.join()
    s += sgl.user("Is the task about numbers?")
    s += sgl.assistant(sgl.select("yes_no", choices=["yes", "no"]))


def test_fork_select_and_run_batch_keep_working(endpoint):
    with workflow("forks"):
        state = fork_and_select.run(question=QUESTIONS[0], backend=endpoint)
        assert state["yes_no"] in ("yes", "no")
        states = solver.run_batch([{"question": q} for q in QUESTIONS[:2]], backend=endpoint)
    assert all(st["answer"] for st in states)


def test_a_server_without_the_kvcomm_backend_is_refused(endpoint, monkeypatch):
    monkeypatch.setattr(endpoint, "_checked_backend", False)
    monkeypatch.setattr(endpoint, "get_server_info", lambda: {"radix_cache_backend": None})
    with workflow("vanilla"):
        state = solver.run(question=QUESTIONS[0], backend=endpoint)
        error = state.error()
    assert isinstance(error, RuntimeError) and "kvcomm-sglang serve" in str(error)


def test_a_server_that_is_down_names_the_url():
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        KVCommEndpoint("http://127.0.0.1:9")
