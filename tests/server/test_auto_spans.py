"""Auto mode's span finding and call planning, on the test model's real tokenizer (no server)."""

import pytest

from kvcomm_sglang import protocol
from kvcomm_sglang.runtime_patch.auto_spans import char_spans, token_spans
from kvcomm_sglang.runtime_patch.auto_workflows import (MAX_MESSAGES, AutoWorkflow,
                                                       WorkflowTable, namespace_for)

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
ANSWER = "Tom has 8 apples now, because 3 plus 5 is 8."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvcomm_sglang import models

    return AutoTokenizer.from_pretrained(models.default_model_dir())


def chat(tokenizer, system, *contents):
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": c} for c in contents]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, list(enc["input_ids"]), enc["offset_mapping"]


def plan(wf, tokenizer, system, *contents):
    text, ids, offsets = chat(tokenizer, system, *contents)
    spans = token_spans(text, offsets, char_spans(text, wf.candidates(), contents, 12))
    tokenize = lambda t: tuple(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return ids, spans, wf.plan(ids, spans, tokenize)


def test_chat_contents_become_token_exact_spans(tokenizer):
    wf = AutoWorkflow("kvcomm:test")
    ids, spans, call = plan(wf, tokenizer, "You are a solver.", QUESTION)
    assert len(spans) == 1 and spans[0].text == QUESTION
    assert tokenizer.decode(ids[spans[0].start:spans[0].end]) == QUESTION
    hints = protocol.decode(call.hints)
    protocol.validate(hints, len(ids), "kvcomm:" + "a" * 22)
    assert [p.kind for p in hints.layout] == ["template", "content", "template"]
    assert hints.layout[1].placeholder == "user_question" and hints.capture[1] == "agent_0_current"
    assert call.template_pass is not None and call.first_computed == 1  # no base request
    (message,) = call.messages
    assert list(message.ids) == ids[spans[0].start:spans[0].end]
    assert hints.layout[1].message == message.id and hints.base is None


def test_a_finished_call_leaves_its_messages_held_and_a_lost_template_resent(tokenizer):
    wf = AutoWorkflow("kvcomm:test")
    call = plan(wf, tokenizer, "You are a solver.", QUESTION)[2]
    wf.finished("unknown_message", call)          # the dense call stored the question
    wf.templates_sent.add(call.agent)
    again = plan(wf, tokenizer, "You are a solver.", QUESTION)[2]
    assert again.first_computed == 0 and again.template_pass is None
    wf.finished("unknown_template", again)
    assert plan(wf, tokenizer, "You are a solver.", QUESTION)[2].template_pass is not None


def test_earlier_output_inside_a_message_is_found_and_second_call_sends_nothing(tokenizer):
    wf = AutoWorkflow("kvcomm:test")
    plan(wf, tokenizer, "You are a solver.", QUESTION)
    answer_ids = tuple(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    wf.add(ANSWER, answer_ids, 0, "agent_0_current", "0", "m9", on_server=True)
    wf.on_server.update(m.id for m in wf.candidates())
    wf.templates_sent.add("0")
    ids, spans, call = plan(wf, tokenizer, "You are a critic.", QUESTION,
                            f"solver answered:\n{ANSWER}")
    hints = protocol.decode(call.hints)
    assert [p.message for p in hints.layout if p.kind == "content"][1] == "m9"
    assert [p.placeholder for p in hints.layout if p.kind == "content"] == [
        "user_question", "agent_0_current"]
    assert call.agent == "1" and call.first_computed == 0 and call.template_pass is not None
    wf.templates_sent.add("1")
    again = plan(wf, tokenizer, "You are a critic.", QUESTION, f"solver answered:\n{ANSWER}")[2]
    assert again.template_pass is None and again.first_computed == 0 and again.agent == "1"


def test_an_output_retokenized_otherwise_is_a_copy_the_call_computes_first(tokenizer):
    wf = AutoWorkflow("kvcomm:test")
    wf.add(ANSWER, (5, 6, 7, 8, 9), 5, "agent_5_current", "5", "m1", on_server=True)
    ids, spans, call = plan(wf, tokenizer, "You are a critic.", f"The solver said:\n{ANSWER}")
    (message,) = call.messages
    assert message.id.startswith("m1.") and message.role == 5 and message.text == ANSWER
    assert protocol.decode(call.hints).layout[1].placeholder == "agent_5_current"
    assert call.first_computed == 1
    assert plan(wf, tokenizer, "You are a critic.", f"The solver said:\n{ANSWER}")[2].messages \
        == (message,)                                  # one copy per message and token ids


def test_a_prompt_without_shared_spans_only_captures(tokenizer):
    wf = AutoWorkflow("kvcomm:test")
    text, ids, offsets = chat(tokenizer, "You are a solver.", "Hi")
    call = wf.plan(ids, token_spans(text, offsets, char_spans(text, [], ["Hi"], 12)), None)
    hints = protocol.decode(call.hints)
    assert not hints.layout and hints.capture and call.agent is None


def test_straddling_tokens_stay_template_text():
    text = "ab cdef gh"
    offsets = [(0, 2), (2, 5), (5, 7), (7, 10)]        # "ab", " cd", "ef", " gh"
    spans = token_spans(text, offsets, [(3, 7, None)], min_tokens=1)     # "cdef"
    assert [(s.start, s.end, s.text) for s in spans] == [(2, 3, "ef")]
    assert token_spans(text, offsets, [(7, 10, None)], min_tokens=1) == []   # the last token


def test_namespaces_are_keyed_per_tenant_and_workflow_and_valid():
    secret = b"s" * 32
    a = namespace_for(secret, "key-a", "wf")
    assert protocol.validate_namespace(a) == a
    assert a == namespace_for(secret, "key-a", "wf")
    assert a != namespace_for(secret, "key-b", "wf") != namespace_for(secret, "key-a", "wf2")
    assert a != namespace_for(b"t" * 32, "key-a", "wf")
    app_a = protocol.split_namespace(a)[0]
    assert app_a == protocol.split_namespace(namespace_for(secret, "key-a", "other"))[0]
    assert app_a != protocol.split_namespace(namespace_for(secret, "key-b", "wf"))[0]


def test_bounds():
    wf = AutoWorkflow("kvcomm:test")
    for i in range(MAX_MESSAGES + 5):
        wf.add(f"message number {i:04d}", (i,), None, "user_question")
    assert len(wf.messages) == MAX_MESSAGES and "message number 0000" not in wf.by_text
    table = WorkflowTable(limit=2)
    first = table.get("a")
    table.get("b")
    table.get("c")
    assert list(table.workflows) == ["b", "c"] and table.get("a") is not first


# ---- bounds a hostile or careless client meets (a cold review found both) ----
def test_a_workflow_of_span_less_prompts_forgets_old_roles_instead_of_locking_agents_out():
    from kvcomm_sglang.runtime_patch.auto_workflows import MAX_ROLES
    wf = AutoWorkflow("kvcomm:x")
    roles = [wf.role_of((i,)) for i in range(MAX_ROLES + 6)]
    assert roles == list(range(MAX_ROLES + 6))           # every prompt still gets a role
    assert len(wf.roles) == MAX_ROLES and (0,) not in wf.roles
    assert wf.role_of((0,)) == MAX_ROLES + 6             # back as a new role, never a reused number
    assert wf.role_of((7,)) == 7                         # a recent role keeps its number


def test_a_text_repeated_through_a_huge_prompt_is_found_once_per_message_and_fast():
    import time

    from kvcomm_sglang.prompt import Message, segment
    body = "the same twelve chars. "
    message = Message("m1", body, (1, 2, 3), 0, "agent_0_current", 1)
    start = time.perf_counter()
    found = segment("x" + body * 20000 + "end", [message])
    assert time.perf_counter() - start < 2.0             # was quadratic: ~45 s at 260 K chars
    assert found.messages == (message,) and found.texts[0] == "x"


def test_a_client_minting_workflow_ids_pushes_out_only_its_own_tenants_workflows():
    table = WorkflowTable(limit=4)
    quiet = [namespace_for(b"k", "tenant-a", f"w{i}") for i in range(2)]
    for ns in quiet:
        table.get(ns)
    for i in range(50):                                  # another tenant floods new workflows
        table.get(namespace_for(b"k", "tenant-b", f"flood-{i}"))
    assert all(ns in table.workflows for ns in quiet) and len(table.workflows) == 4


def test_a_call_finishing_after_its_messages_were_forgotten_adds_nothing(tokenizer):
    """``finished`` notes a call's messages as held, but not those the workflow dropped while
    the call ran (``MAX_MESSAGES``): ``on_server`` stays bounded by the messages it knows."""
    wf = AutoWorkflow("kvcomm:test")
    call = plan(wf, tokenizer, "You are a solver.", QUESTION)[2]
    for i in range(MAX_MESSAGES):
        wf.add(f"text {i}", (i,), 0, "agent_0_current", "0", f"x{i}")
    assert call.messages[0].id not in wf.messages
    wf.finished(None, call)
    assert wf.on_server == set()
