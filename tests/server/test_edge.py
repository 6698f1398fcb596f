"""The HTTP edge of a real KVCOMM server (SGLang 0.5.17 on CPU, SmolLM2-135M): every malformed
request gets a 4xx whose message names the reason, never a 5xx, and the server keeps serving
(docs/protocol.md, "What the server does"). Unknown message ids and templates are not refused:
they are served densely with the reason in the report."""

import json
import secrets

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomm_sglang import protocol
from kvcomm_sglang.protocol import Piece

VOCAB = 49152                           # SmolLM2-135M's vocab_size
MAX_EXTRA_KEY_BYTES = 4096              # docs/protocol.md
PROMPT = [1, 504, 3458, 314, 4849]
MAX_NEW_TOKENS = 3
TIMEOUT_S = 120


def request_body(input_ids=PROMPT, extra_key=None, custom=None, max_new_tokens=MAX_NEW_TOKENS):
    params = {"temperature": 0, "max_new_tokens": max_new_tokens}
    if custom is not None:
        params["custom_params"] = custom
    body = {"input_ids": input_ids, "sampling_params": params}
    if extra_key is not None:
        body["extra_key"] = extra_key
    return body


def post(server, body, path="/generate") -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=TIMEOUT_S)


def new_namespace() -> str:
    return "kvcomm:" + secrets.token_urlsafe(16)


def assert_refused(resp: requests.Response, reason: str) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:2000])
    message = resp.json()["error"]["message"]
    assert reason in message, (reason, message[:2000])


@pytest.fixture(scope="module")
def baseline(kvcomm_server) -> list[int]:
    resp = post(kvcomm_server, request_body())
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def assert_still_serving(server, baseline) -> None:
    assert server.process.poll() is None, f"{server} exited\n{server.log_tail()}"
    resp = post(server, request_body())
    assert resp.status_code == 200, resp.text
    assert resp.json()["output_ids"] == baseline


@pytest.mark.parametrize("input_ids,reason", [
    ([1, 2, 3, 1_000_000_000], "input_ids[3] = 1000000000"),
    ([1, 2, 3, VOCAB], f"input_ids[3] = {VOCAB}"),
    ([1, -1, 3], "input_ids[1] = -1"),
    ([-(2 ** 63), 2, 3], "input_ids[0]")], ids=["1e9", "vocab_size", "-1", "-2**63"])
def test_token_ids_outside_the_vocabulary_get_400_and_the_server_lives(kvcomm_server, baseline,
                                                                       input_ids, reason):
    assert_refused(post(kvcomm_server, request_body(input_ids)), reason)
    assert_still_serving(kvcomm_server, baseline)


def test_bad_token_ids_in_every_entry_point_get_400(kvcomm_server, baseline):
    batch = request_body([PROMPT, [1, 2, 1_000_000_000]])
    assert_refused(post(kvcomm_server, batch), "input_ids[2] = 1000000000")
    completion = {"model": "default", "prompt": [1, 2, 3, 1_000_000_000], "max_tokens": 2}
    resp = post(kvcomm_server, completion, "/v1/completions")
    assert resp.status_code == 400 and "input_ids[3] = 1000000000" in resp.text, resp.text
    stream = {**request_body([1, 2, -5]), "stream": True}
    resp = post(kvcomm_server, stream)        # SGLang streams the 400 as an error event
    events = [json.loads(line[len("data: "):]) for line in resp.text.splitlines()
              if line.startswith("data: {")]
    assert events and events[0]["error"]["code"] == 400, resp.text
    assert "input_ids[2] = -5" in events[0]["error"]["message"]
    assert_still_serving(kvcomm_server, baseline)


def test_deeply_nested_hints_get_400(kvcomm_server, baseline):
    for depth in (5000, 30000, 10):
        custom = {"kvcomm": '{"v": 1, "agent": ' + "[" * depth + "]" * depth + "}"}
        assert_refused(post(kvcomm_server, request_body(extra_key=new_namespace(),
                                                        custom=custom)), "nested deeper")
    assert_still_serving(kvcomm_server, baseline)


def test_huge_and_invalid_extra_keys_get_400(kvcomm_server, baseline):
    hints = protocol.encode(base=("m", "user_question", 1))
    one_mb = "x" * 2 ** 20
    for extra_key, custom in [("kvcomm:" + one_mb, None), ("kvcomm:" + one_mb, hints),
                              (one_mb, None), ("kvcomm:e2e", None), ("kvcomm:e2e", hints)]:
        assert_refused(post(kvcomm_server, request_body(extra_key=extra_key, custom=custom)),
                       "extra_key")
    plain = post(kvcomm_server, request_body(extra_key="x" * MAX_EXTRA_KEY_BYTES))
    assert plain.status_code == 200, plain.text          # other keys are SGLang's, up to 4 KiB
    assert_still_serving(kvcomm_server, baseline)


def template_pass(server, namespace: str) -> None:
    layout = [Piece("template", 3), Piece("content", 2, "user_question", "standin"),
              Piece("template", 3)]
    custom = protocol.encode(agent="0", layout=layout, template=True)
    resp = post(server, request_body([1, 504, 3458, 28, 29, 314, 4849, 30], namespace, custom, 1))
    assert resp.status_code == 200, resp.text


def kvcomm_report(resp: requests.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]["kvcomm"][0]


def test_unknown_message_and_template_are_served_densely_with_the_reason(kvcomm_server, baseline):
    namespace = new_namespace()
    layout = [Piece("template", 3), Piece("content", 2, "user_question", "never-captured"),
              Piece("template", 3)]
    custom = protocol.encode(agent="0", layout=layout)
    ids = [1, 504, 3458, 40, 41, 314, 4849, 30]
    report = kvcomm_report(post(kvcomm_server, request_body(ids, namespace, custom)))
    assert (report["mode"], report["fallback_reason"]) == ("dense", "unknown_template"), report
    template_pass(kvcomm_server, namespace)
    layout[1] = Piece("content", 2, "user_question", "never-computed")
    custom = protocol.encode(agent="0", layout=layout)
    report = kvcomm_report(post(kvcomm_server, request_body(ids, namespace, custom)))
    assert (report["mode"], report["fallback_reason"]) == ("dense", "unknown_message"), report
    # that dense call computed the message first and stored it: the next call plans with it
    report = kvcomm_report(post(kvcomm_server, request_body(ids, namespace, custom)))
    assert report["fallback_reason"] != "unknown_message", report
    assert_still_serving(kvcomm_server, baseline)


# ---- property-based: random malformed bodies, each refused with its reason ----
NAMESPACE = new_namespace()
in_vocab = st.integers(min_value=0, max_value=VOCAB - 1)
out_of_vocab = st.one_of(st.integers(min_value=VOCAB, max_value=2 ** 63 - 1),
                         st.integers(min_value=-(2 ** 63), max_value=-1))


@st.composite
def bad_token_ids(draw):
    ids = draw(st.lists(in_vocab, min_size=1, max_size=8))
    position = draw(st.integers(min_value=0, max_value=len(ids)))
    ids.insert(position, draw(out_of_vocab))
    return request_body(ids), f"input_ids[{position}]"


bad_extra_keys = st.one_of(
    st.integers(min_value=MAX_EXTRA_KEY_BYTES + 1, max_value=2 ** 20).map(
        lambda n: "k" * n),
    st.text(alphabet="abcXYZ019-_", max_size=21).map(lambda s: "kvcomm:" + s),
    st.text(alphabet=".~!/ :@", min_size=1, max_size=30).map(lambda s: "kvcomm:" + "w" * 22 + s))


@st.composite
def bad_namespaces(draw):
    custom = draw(st.none() | st.just(protocol.encode(base=("m", "user_question", 1))))
    return request_body(extra_key=draw(bad_extra_keys), custom=custom), "extra_key"


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
    | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["v", "agent", "layout", "t", "n", "ph", "id", "x"]), inner, max_size=3),
    max_leaves=10)
envelopes = st.fixed_dictionaries({"v": st.just(1) | json_like}, optional={
    "agent": json_like, "template": json_like, "base": json_like, "capture": json_like,
    "layout": json_like | st.lists(st.fixed_dictionaries(
        {"t": st.sampled_from(["template", "content"]), "n": json_like}), max_size=3)})


@st.composite
def bad_hints(draw):
    raw = draw(st.one_of(envelopes.map(json.dumps), json_like.map(json.dumps),
                         st.integers(min_value=5, max_value=30000).map(lambda d: "[" * d)))
    try:
        hints = protocol.decode({"kvcomm": raw})
        protocol.validate(hints, len(PROMPT), NAMESPACE)
    except ValueError as exc:
        return request_body(extra_key=NAMESPACE, custom={"kvcomm": raw}), str(exc)
    return request_body(extra_key=NAMESPACE, custom={"kvcomm": raw + "x"}), "not valid JSON"


@st.composite
def mismatched_layouts(draw):
    lengths = draw(st.lists(st.integers(min_value=1, max_value=10), min_size=3, max_size=3).filter(
        lambda n: sum(n) != len(PROMPT)))
    layout = [Piece("template", lengths[0]), Piece("content", lengths[1], "user_question", "q"),
              Piece("template", lengths[2])]
    custom = protocol.encode(agent="0", layout=layout)
    return request_body(extra_key=NAMESPACE, custom=custom), "sum to"


@settings(max_examples=100, deadline=None, database=None)
@given(case=st.one_of(bad_token_ids(), bad_namespaces(), bad_hints(), mismatched_layouts()))
def test_random_malformed_requests_get_4xx_with_the_reason(kvcomm_server, baseline, case):
    body, reason = case
    assert_refused(post(kvcomm_server, body), reason)


def test_the_server_serves_correctly_after_the_malformed_requests(kvcomm_server, baseline):
    assert_still_serving(kvcomm_server, baseline)


@pytest.mark.parametrize("body, reason", [
    ({"input_ids": PROMPT, "sampling_params": {"temperature": "hot", "max_new_tokens": 2}},
     "sampling_params"),
    ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": [3]}}, "sampling_params"),
])
def test_bad_sampling_params_get_400_not_500(kvcomm_server, baseline, body, reason):
    assert_refused(post(kvcomm_server, body), reason)
    assert_still_serving(kvcomm_server, baseline)
