"""Property-based tests of the KVCOMM protocol (hypothesis): whatever a client sends, decode and
validate either accept it or raise ValueError with a short ASCII reason; valid hints round-trip
through encode and decode; lengths that do not add up are refused."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcomm_sglang import protocol
from kvcomm_sglang.protocol import Hints, Piece

MAX_REASON_CHARS = 600
NAMESPACE = "kvcomm:" + "w" * 22
PLACEHOLDERS = ["user_question", "agent_0_current", "agent_1_history", "condition_a_current",
                "condition_2_history"]
FIELDS = sorted(protocol.KEYS)
PIECE_FIELDS = ["t", "n", "ph", "id"]

numbers = st.one_of(
    st.booleans(), st.integers(), st.integers(min_value=-(10 ** 80), max_value=10 ** 80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 63]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(
    ["template", "content", "user_question", "agent_1_current", "a\n", "\udc80", "\u4e2d\u00e9"]))
scalars = st.one_of(st.none(), numbers, texts)
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(texts, st.sampled_from(
        FIELDS + PIECE_FIELDS)), inner, max_size=4)), max_leaves=12)
pieces = st.one_of(json_like, st.fixed_dictionaries(
    {"t": st.sampled_from(["template", "content"]), "n": json_like},
    optional={"ph": json_like, "id": json_like}))
envelopes = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), json_like), "agent": json_like, "template": json_like,
    "layout": st.one_of(json_like, st.lists(pieces, max_size=5)), "base": json_like,
    "capture": json_like, "extra": json_like})


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


raw_payloads = st.one_of(
    json_like.map(lambda value: json.dumps(value)),
    envelopes.map(lambda value: json.dumps(value)),
    st.text(max_size=200),
    st.integers(min_value=1, max_value=20_000).map(deep),
    st.integers(min_value=1, max_value=3000).map(lambda d: '{"v": 1, "agent": ' + deep(d) + "}"),
    st.integers(min_value=4300, max_value=6000).map(lambda d: '{"v": 1, "n": 1' + "0" * d + "}"))
custom_params = st.one_of(
    raw_payloads.map(lambda raw: {protocol.CUSTOM_PARAMS_KEY: raw}),
    json_like.map(lambda value: {protocol.CUSTOM_PARAMS_KEY: value}),
    json_like)
extra_keys = st.one_of(st.none(), texts, st.just(NAMESPACE), numbers,
                       st.text(alphabet="abcAB-_09", min_size=15, max_size=140).map(
                           lambda s: "kvcomm:" + s))


def assert_good_reason(exc: ValueError) -> None:
    reason = str(exc)
    assert reason and reason.isascii() and len(reason) <= MAX_REASON_CHARS, ascii(reason)[:2000]


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(custom=custom_params, num_input_ids=st.integers(min_value=0, max_value=300),
       extra_key=extra_keys)
def test_decode_and_validate_only_ever_raise_value_error(custom, num_input_ids, extra_key):
    try:
        hints = protocol.decode(custom)
        if hints is not None:
            protocol.validate(hints, num_input_ids, extra_key)
    except ValueError as exc:
        assert_good_reason(exc)


@settings(max_examples=300, deadline=None, database=None)
@given(extra_key=st.one_of(extra_keys, json_like, st.text(min_size=4000, max_size=5000)))
def test_extra_key_checks_only_ever_raise_value_error(extra_key):
    for check in (protocol.validate_extra_key, protocol.validate_namespace):
        try:
            check(extra_key)
        except ValueError as exc:
            assert_good_reason(exc)


@settings(max_examples=300, deadline=None, database=None)
@given(ids=st.one_of(st.lists(st.one_of(st.integers(min_value=0, max_value=999), json_like),
                              max_size=20), json_like))
def test_input_id_check_accepts_exactly_the_vocabulary(ids):
    in_vocab = isinstance(ids, list) and all(type(t) is int and 0 <= t < 1000 for t in ids)
    try:
        protocol.validate_input_ids(ids, 1000)
    except ValueError as exc:
        assert_good_reason(exc)
        assert not in_vocab
    else:
        assert in_vocab


ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True)


@st.composite
def valid_hints(draw) -> tuple[dict, Hints]:
    names = draw(st.lists(st.sampled_from(PLACEHOLDERS), unique=True, max_size=4))
    lengths = st.integers(min_value=0, max_value=2 ** 20)
    layout = [Piece("template", draw(lengths))]
    for name in names:
        layout += [Piece("content", draw(lengths), name, draw(ids)), Piece("template",
                                                                           draw(lengths))]
    fields = {"agent": draw(ids), "layout": layout, "template": draw(st.booleans()),
              "capture": draw(st.none() | st.tuples(ids, st.sampled_from(PLACEHOLDERS))),
              "base": draw(st.none() | st.tuples(ids, st.sampled_from(PLACEHOLDERS), lengths))}
    return fields, Hints(fields["agent"], tuple(layout), fields["template"], fields["base"],
                         fields["capture"])


@settings(max_examples=150, deadline=None, database=None)
@given(valid_hints())
def test_encode_round_trips_through_decode(case):
    fields, expected = case
    assert protocol.decode(protocol.encode(**fields)) == expected


@settings(max_examples=150, deadline=None, database=None)
@given(case=valid_hints(), shift=st.integers(min_value=-(10 ** 6), max_value=10 ** 6))
def test_layout_lengths_that_do_not_add_up_are_refused(case, shift):
    fields, hints = case
    fields["base"] = None
    hints = protocol.decode(protocol.encode(**fields))
    total = sum(p.length for p in hints.layout)
    if hints.layout[-1].length > 0:
        protocol.validate(hints, total, NAMESPACE)
    if shift and total + shift >= 0:
        with pytest.raises(ValueError, match="sum to"):
            protocol.validate(hints, total + shift, NAMESPACE)
