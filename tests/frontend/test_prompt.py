"""Prompt segmentation and placeholder naming (pure, no server)."""

import pytest

from kvcomm_sglang.frontend.prompt import (Message, Unexpressible, argument_placeholder,
                                           name_placeholders, segment)

Q = Message("u1", "What is the capital of France?", (1, 2, 3), None, "user_question", 1)
A0 = Message("m2", "The capital is Paris, of course.", (4, 5), 0, "agent_0_current", 2)
A0_OLD = Message("m0", "I think it is Lyon, maybe.", (6,), 0, "agent_0_current", 0)


def test_segment_finds_messages_in_order_and_keeps_template_text():
    text = f"<sys>Q: {Q.text}\nA: {A0.text}\nCheck it."
    found = segment(text, [A0, Q])
    assert found.messages == (Q, A0)
    assert found.texts == ("<sys>Q: ", "\nA: ", "\nCheck it.")


def test_segment_leaves_a_message_that_ends_the_prompt_and_short_texts():
    assert segment(f"x {Q.text}", [Q]).messages == ()
    short = Message("m9", "Paris", (1,), 0, "agent_0_current", 9)
    assert segment("x Paris y", [short]).messages == ()


def test_placeholders_current_history_and_own():
    found = segment(f"a {Q.text} b {A0_OLD.text} c {A0.text} d", [Q, A0, A0_OLD])
    assert name_placeholders(found, consumer_role=1) == (
        "user_question", "agent_0_history", "agent_0_current")
    own = segment(f"a {Q.text} b {A0.text} d", [Q, A0])
    assert name_placeholders(own, consumer_role=0) == ("user_question", "agent_0_history")
    with pytest.raises(Unexpressible):
        name_placeholders(found, consumer_role=0)      # two own messages: one history slot


def test_argument_placeholders():
    assert argument_placeholder("question", True) == "user_question"
    assert argument_placeholder("passages_1", False) == "condition_passages1_current"


def test_two_messages_with_the_same_text_fill_its_occurrences_oldest_first():
    twin = Message("m5", A0.text, A0.ids, 1, "agent_1_current", 5)
    found = segment(f"a {Q.text} b {A0.text} c {A0.text} d", [Q, twin, A0])
    assert [m.id for m in found.messages] == ["u1", "m2", "m5"]
    assert name_placeholders(found, 2) == ("user_question", "agent_0_current", "agent_1_current")
