"""The KVCOMM request protocol's edge checks (docs/protocol.md): each malformed input is refused
with a ValueError whose message names the reason, is ASCII and short (the HTTP layer sends it
back as JSON)."""

import json

import pytest

from kvcomm_sglang import protocol
from kvcomm_sglang.protocol import Piece

WORKFLOW = "kvcomm:" + "w" * 22          # the shortest valid namespace
VOCAB = 49152


def hints_of(payload) -> dict:
    raw = payload if isinstance(payload, str) else json.dumps(payload)
    return {protocol.CUSTOM_PARAMS_KEY: raw}


def refused(custom, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        protocol.decode(custom)
    return str(info.value)


def nested(depth: int, leaf="0") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("depth", [5, 200, 5000, 30000])
def test_deeply_nested_hints_are_refused_not_a_recursion_error(depth):
    refused(hints_of(nested(depth)), "nested")
    refused(hints_of('{"v": 1, "agent": ' + nested(depth) + "}"), "nested")
    refused(hints_of('{"v": 1, "layout": [{"t": "template", "n": ' + nested(depth) + "}]}"),
            "nested")


def test_brackets_inside_strings_do_not_count_as_nesting():
    hints = protocol.decode(hints_of({"v": 1, "agent": "a", "capture": {
        "message": "m", "placeholder": "user_question"}, "layout": []}))
    assert hints.capture == ("m", "user_question")
    refused(hints_of({"v": 1, "agent": "[[[[[[[[[[{{{{{{{{"}), "agent must be an id")


@pytest.mark.parametrize("version", [True, 1.0, "1", [1], None, 2])
def test_only_the_integer_1_is_version_1(version):
    refused(hints_of({"v": version}), "version")


@pytest.mark.parametrize("name", ["a\n", "a" * 129, "", "\u00e9", 7, None, ["a"]])
def test_ids_are_matched_whole(name):
    if name is not None:
        refused(hints_of({"v": 1, "agent": name}), "agent must be an id")
    refused(hints_of({"v": 1, "capture": {"message": name, "placeholder": "user_question"}}),
            "capture.message must be an id")


@pytest.mark.parametrize("name", ["user_question\n", "agent_1_current\n", "x" * 10_000,
                                  "agent__current", "\udc80"])
def test_placeholders_are_matched_whole_and_bounded(name):
    message = refused(hints_of({"v": 1, "capture": {"message": "m", "placeholder": name}}),
                      "capture.placeholder")
    assert len(message) < 400 and message.isascii()


@pytest.mark.parametrize("n", [10 ** 100, -1, 1.0, True, "3", 2 ** 31])
def test_piece_lengths_are_bounded_integers(n):
    refused(hints_of({"v": 1, "layout": [{"t": "template", "n": n}]}), r"layout\[0\]\.n")


def test_integers_beyond_python_s_digit_limit_are_a_json_error():
    refused(hints_of('{"v": 1, "layout": [{"t": "template", "n": 1' + "0" * 5000 + "}]}"),
            "not valid JSON")


def test_lone_surrogates_and_unicode_are_refused_with_an_ascii_reason():
    for payload in ['{"v": 1, "agent": "\udc80"}', '{"v": 1, "agent": "\\ud800"}',
                    '{"v": 1, "\u00e9\u4e2d": 1}', "\udc80"]:
        with pytest.raises(ValueError) as info:
            protocol.decode(hints_of(payload))
        assert str(info.value).isascii(), str(info.value).encode("ascii", "backslashreplace")


@pytest.mark.parametrize("raw", [None, 1, 1.5, True, [], {}, b"{}"])
def test_hints_that_are_not_a_string_are_refused(raw):
    refused({protocol.CUSTOM_PARAMS_KEY: raw}, "JSON string")


@pytest.mark.parametrize("field,value", [("layout", {"t": "template"}), ("layout", [[1]]),
                                         ("layout", [{"t": ["template"], "n": 1}]),
                                         ("base", [1]), ("capture", "m"), ("template", 1),
                                         ("base", {"message": "m", "placeholder": "user_question",
                                                   "drop": 2 ** 40})])
def test_wrong_types_at_every_level_are_refused(field, value):
    refused(hints_of({"v": 1, field: value}), field)


@pytest.mark.parametrize("extra_key", [WORKFLOW, "kvcomm:" + "A-_9" * 32])
def test_valid_namespaces(extra_key):
    assert protocol.validate_namespace(extra_key) == extra_key
    protocol.validate_extra_key(extra_key)


@pytest.mark.parametrize("extra_key", ["kvcomm:", "kvcomm:short", "kvcomm:" + "w" * 21,
                                       "kvcomm:" + "w" * 129, "kvcomm:" + "w" * 22 + "\n",
                                       "kvcomm:" + "w" * 21 + ".", "KVCOMM:" + "w" * 22,
                                       "kvcomm:" + "x" * 2 ** 20, None, 7])
def test_invalid_namespaces(extra_key):
    with pytest.raises(ValueError, match="namespace") as info:
        protocol.validate_namespace(extra_key)
    assert len(str(info.value)) < 400


def test_every_kvcomm_extra_key_must_be_a_namespace_and_others_are_bounded():
    for bad in ["kvcomm:short", "kvcomm:" + "x" * 2 ** 20, "y" * 4097, "\u00e9" * 2049, 7,
                ["a"]]:
        with pytest.raises(ValueError, match="extra_key"):
            protocol.validate_extra_key(bad)
    for good in [None, "", "plain:e2e", "y" * 4096, "\u00e9" * 2048, WORKFLOW]:
        protocol.validate_extra_key(good)


def test_hinted_requests_need_a_namespace():
    hints = protocol.decode(protocol.encode(base=("m", "user_question", 1)))
    protocol.validate(hints, 3, WORKFLOW)
    for extra_key in [None, "plain", "kvcomm:short", "kvcomm:" + "x" * 2 ** 20]:
        with pytest.raises(ValueError, match="extra_key"):
            protocol.validate(hints, 3, extra_key)


def test_layout_lengths_must_sum_to_the_prompt():
    layout = [Piece("template", 2), Piece("content", 3, "user_question", "q"), Piece("template", 1)]
    hints = protocol.decode(protocol.encode(agent="0", layout=layout))
    protocol.validate(hints, 6, WORKFLOW)
    for num_input_ids in (0, 5, 7, 10 ** 30):
        with pytest.raises(ValueError, match="sum to"):
            protocol.validate(hints, num_input_ids, WORKFLOW)


def test_input_ids_in_the_vocabulary_pass():
    protocol.validate_input_ids([0, 1, VOCAB - 1], VOCAB)
    protocol.validate_input_ids([], VOCAB)


@pytest.mark.parametrize("token,where", [(1_000_000_000, 3), (-1, 3), (VOCAB, 3), (2.0, 3),
                                         (True, 3), ("5", 3), (None, 3), ([1], 3),
                                         (10 ** 5000, 3), (-(2 ** 70), 0)],
                         ids=["1e9", "-1", "vocab_size", "float", "bool", "str", "null", "list",
                              "5000-digits", "-2**70"])
def test_input_ids_outside_the_vocabulary_are_refused(token, where):
    ids = [1, 2, 3, 4]
    ids[where] = token
    with pytest.raises(ValueError, match=rf"input_ids\[{where}\]") as info:
        protocol.validate_input_ids(ids, VOCAB)
    assert f"[0, {VOCAB})" in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("ids", [None, "1 2 3", 5, {"0": 1}])
def test_input_ids_must_be_a_list(ids):
    with pytest.raises(ValueError, match="input_ids"):
        protocol.validate_input_ids(ids, VOCAB)


def test_piece_spans_and_template_of_follow_the_layout():
    from kvcomm_sglang.protocol import Piece, piece_spans, template_of
    layout = [Piece("template", 2), Piece("content", 3, "user_question", "q"),
              Piece("template", 1), Piece("content", 0, "agent_0_current", "a"),
              Piece("template", 2)]
    assert [(p.kind, s, e) for p, s, e in piece_spans(layout)] == [
        ("template", 0, 2), ("content", 2, 5), ("template", 5, 6), ("content", 6, 6),
        ("template", 6, 8)]
    ids = [10, 11, 20, 21, 22, 12, 13, 14]
    assert template_of(layout, ids) == ([(10, 11), (12,), (13, 14)],
                                        ["user_question", "agent_0_current"])
