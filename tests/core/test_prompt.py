"""Prompt segmentation and placeholder naming (pure, no server)."""

import pytest

from kvcomm_sglang.prompt import (Message, Unexpressible, argument_placeholder,
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
    # two own messages overflow the one history slot: named per producing agent instead
    assert name_placeholders(found, consumer_role=0) == (
        "user_question", "agent_0_history", "agent_0_current")


def test_argument_placeholders():
    assert argument_placeholder("question", True) == "user_question"
    assert argument_placeholder("passages_1", False) == "condition_passages1_current"


def test_two_messages_with_the_same_text_fill_its_occurrences_oldest_first():
    twin = Message("m5", A0.text, A0.ids, 1, "agent_1_current", 5)
    found = segment(f"a {Q.text} b {A0.text} c {A0.text} d", [Q, twin, A0])
    assert [m.id for m in found.messages] == ["u1", "m2", "m5"]
    assert name_placeholders(found, 2) == ("user_question", "agent_0_current", "agent_1_current")


def test_forks_of_one_role_are_named_per_producing_agent():
    forks = [Message(f"m{i}", f"Fork {i} says the answer is {i}.", (i,), 0, "agent_0_current",
                     10 + i, agent) for i, agent in enumerate(["0", "0.1", "0.2"])]
    text = f"a {Q.text} b {forks[0].text} c {forks[1].text} d {forks[2].text} e"
    found = segment(text, [Q, *forks])
    assert name_placeholders(found, consumer_role=0) == (
        "user_question", "agent_0_current", "agent_0x1_current", "agent_0x2_current")
    again = Message("m20", "Fork 1 said something else.", (9,), 0, "agent_0_current", 20, "0.1")
    third = Message("m21", "Fork 1 said a third thing.", (8,), 0, "agent_0_current", 21, "0.1")
    text = f"a {forks[1].text} b {again.text} c {third.text} d {forks[0].text} e"
    with pytest.raises(Unexpressible, match="3 messages of agent 0.1"):
        name_placeholders(segment(text, [*forks, again, third]), consumer_role=1)
