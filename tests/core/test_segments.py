"""Spec T2 (placement arithmetic), template splitting, layouts, keys, bad input."""

import pytest

from kvcomm_sglang.segments import (PromptLayout, parse_placeholder, place, segment_key,
                                    split_template)


def test_t2_placement_arithmetic():
    p = place(template_lengths=(10, 4, 6, 8), standin_lengths=(5, 5, 5),
              content_lengths=(12, 3, 7), drops=(9, 0, 6))
    assert p.deltas == (7, 5, 7)
    assert p.content_starts == (10, 26, 35)
    assert p.content_offsets == (10 - 9, 26 - 0, 35 - 6)      # s_i + Delta_{i-1} - drop_i
    assert p.template_starts == (0, 22, 29, 42)
    assert p.template_offsets == (0, 7, 5, 7)                 # Delta_i
    assert p.total_length == 43 + 7


def test_t2_layout_matches_direct_concatenation():
    x = [list(range(100, 110)), [1, 2, 3, 4], [5, 6, 7, 8, 9, 10], list(range(200, 208))]
    c = {"user_question": list(range(300, 312)), "agent_0_current": [7, 7, 7],
         "agent_1_current": list(range(400, 407))}
    names = ["user_question", "agent_0_current", "agent_1_current"]
    layout = PromptLayout.assemble(x, names, c)
    direct = x[0] + c[names[0]] + x[1] + c[names[1]] + x[2] + c[names[2]] + x[3]
    assert layout.token_ids == direct
    assert layout.total_length == len(direct) and layout.prefix_length == 10
    p = place([len(t) for t in x], [0, 0, 0], [12, 3, 7])
    assert [q.start for q in layout.content_pieces()] == list(p.content_starts)
    assert [layout.template_piece(i).start for i in range(4)] == list(p.template_starts)


def test_split_template():
    texts, names = split_template("sys {user_question} then {agent_0_current}\nend")
    assert texts == ["sys ", " then ", "\nend"] and names == ["user_question", "agent_0_current"]
    assert parse_placeholder("condition_3_history") == ("condition", "3", "history")


@pytest.mark.parametrize("text,match", [
    ("a {agent_x_now} b", "unknown placeholder"),
    ("a {user_question}{agent_0_current} b", "adjacent"),
    ("a {user_question} b {user_question} c", "twice"),
    ("a {user_question}", "ends with placeholder"),
])
def test_split_template_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        split_template(text)


def test_layout_rejects_bad_input():
    with pytest.raises(ValueError, match="need 2 template pieces"):
        PromptLayout.assemble([[1], [2], [3]], ["user_question"], {"user_question": [1]})
    with pytest.raises(ValueError, match="no content for placeholder"):
        PromptLayout.assemble([[1], [2]], ["user_question"], {})
    with pytest.raises(ValueError, match="not in the template"):
        PromptLayout.assemble([[1], [2]], ["user_question"],
                              {"user_question": [1], "agent_9_current": [2]})
    with pytest.raises(ValueError, match="unknown placeholder"):
        PromptLayout.assemble([[1], [2]], ["agent_current"], {"agent_current": [1]})
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        place([1, 1], [1], [-3])
    with pytest.raises(ValueError, match="n\\+1 template lengths"):
        place([1], [1], [1])


def test_segment_key_is_deterministic_and_namespaced():
    assert segment_key([1, 2, 3], "ns") == segment_key([1, 2, 3], "ns")
    assert segment_key([1, 2, 3], "ns") != segment_key([1, 2, 3], "other")
    assert segment_key([1, 2, 3]) != segment_key([12, 3])
