"""Auto mode asks SGLang for one token more than the client and hides it (CPU server): the
client sees exactly what SGLang gives with ``X-KVCOMM-Auto: off`` for the same request
(text, ids, logprobs, finish reason, usage; streamed or not), and the capture covers the whole
answer the client saw, so the next agent's prompt holding it finds it held (before: a copy
with other ids, computed again)."""

from __future__ import annotations

import json
import secrets

import pytest
import requests

SYSTEM = "You are a careful math solver. Solve the problem step by step."
CRITIC = "You are a critic. Check the solver's arithmetic and point out any mistake."
QUESTION = "A pencil costs 2 dollars. How much do 7 pencils cost?"
OFF = {"X-KVCOMM-Auto": "off"}


@pytest.fixture(scope="module")
def auto_server(server_factory):
    return server_factory("kvcomm", ["--kvcomm-auto"])


def tenant() -> dict:
    """A tenant of its own (an API key no other test uses): no anchors, every call dense."""
    return {"Authorization": f"Bearer hidden-{secrets.token_urlsafe(6)}"}


def post(server, path, body, headers=None) -> dict:
    resp = requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat_body(*contents, system=SYSTEM, **params) -> dict:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": c} for c in contents]
    return {"model": "default", "messages": messages, "max_tokens": 8, "temperature": 0,
            "user": "hidden-test", **params}


def stream(server, path, body, headers=None) -> list[dict]:
    with requests.post(f"{server.url}{path}", json={**body, "stream": True}, headers=headers,
                       stream=True, timeout=300) as resp:
        assert resp.status_code == 200, resp.text
        return [json.loads(line[len(b"data:"):]) for line in resp.iter_lines()
                if line.startswith(b"data:") and line.strip() != b"data: [DONE]"]


def test_a_cut_chat_answer_is_sglangs_own(auto_server):
    key = tenant()
    body = chat_body(QUESTION, logprobs=True, top_logprobs=2)
    auto, dense = post(auto_server, "/v1/chat/completions", body, key), \
        post(auto_server, "/v1/chat/completions", body, {**key, **OFF})
    assert "kvcomm" in auto and "kvcomm" not in dense
    for resp in (auto, dense):
        assert resp["choices"][0]["finish_reason"] == "length"
        assert resp["usage"]["completion_tokens"] == 8
        assert len(resp["choices"][0]["logprobs"]["content"]) == 8
    assert auto["choices"][0]["message"]["content"] == dense["choices"][0]["message"]["content"]
    tokens = [[t["token"] for t in r["choices"][0]["logprobs"]["content"]] for r in (auto, dense)]
    assert tokens[0] == tokens[1]


def test_a_cut_streamed_chat_answer_is_sglangs_own(auto_server):
    key = tenant()
    body = chat_body(QUESTION, stream_options={"include_usage": True})
    runs = [stream(auto_server, "/v1/chat/completions", body, h) for h in (key, {**key, **OFF})]
    texts, finishes, usages = [], [], []
    for chunks in runs:
        choices = [c["choices"][0] for c in chunks if c.get("choices")]
        texts.append("".join(c["delta"].get("content") or "" for c in choices))
        finishes.append([c["finish_reason"] for c in choices if c.get("finish_reason")])
        usages.append([c["usage"]["completion_tokens"] for c in chunks if c.get("usage")])
    assert texts[0] == texts[1] and finishes == [["length"], ["length"]], (texts, finishes)
    assert usages[0][-1] == usages[1][-1] == 8
    assert "kvcomm" in runs[0][0] and not any("kvcomm" in c for c in runs[1])


def test_generate_streamed_or_not_shows_max_new_tokens_ids(auto_server):
    key = tenant()
    body = {"text": "Question: " + QUESTION + "\nAnswer:", "sampling_params": {
        "max_new_tokens": 6, "temperature": 0}}
    auto, dense = post(auto_server, "/generate", body, key), \
        post(auto_server, "/generate", body, {**key, **OFF})
    assert "kvcomm_auto" in auto["meta_info"]
    assert auto["output_ids"] == dense["output_ids"] and len(auto["output_ids"]) == 6
    assert auto["text"] == dense["text"]
    for resp in (auto, dense):
        assert resp["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
        assert resp["meta_info"]["completion_tokens"] == 6
    chunks = stream(auto_server, "/generate", body, key)
    last = chunks[-1]
    assert last["text"] == dense["text"] and last["output_ids"] == dense["output_ids"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert all(len(c["output_ids"]) <= 6 for c in chunks)


def test_an_answer_that_stops_early_is_untouched(auto_server):
    key = tenant()
    body = chat_body(QUESTION, max_tokens=24, stop=[" "])      # stops at its first space
    auto, dense = post(auto_server, "/v1/chat/completions", body, key), \
        post(auto_server, "/v1/chat/completions", body, {**key, **OFF})
    for resp in (auto, dense):
        assert resp["choices"][0]["finish_reason"] == "stop"
    assert auto["choices"][0]["message"]["content"] == dense["choices"][0]["message"]["content"]
    assert auto["usage"]["completion_tokens"] == dense["usage"]["completion_tokens"] < 24


def test_the_next_agent_finds_the_whole_cut_answer_captured(auto_server):
    """The solver's answer is cut at 16 tokens; the critic's prompt holds it whole. Before the
    hidden token, its capture lacked the last token: the critic's prompt held a copy with other
    ids, for which auto mode sent a base request."""
    key = tenant()
    solver = post(auto_server, "/v1/chat/completions", chat_body(QUESTION, max_tokens=16), key)
    answer = solver["choices"][0]["message"]["content"]
    assert solver["choices"][0]["finish_reason"] == "length"
    critic = post(auto_server, "/v1/chat/completions",
                  chat_body(QUESTION, f"solver answered:\n{answer}", system=CRITIC), key)
    assert critic["kvcomm"]["first_computed"] == 0, critic["kvcomm"]
    assert critic["kvcomm"]["fallback_reason"] != "unknown_message", critic["kvcomm"]


def test_an_answer_tokenized_otherwise_in_the_next_prompt_is_served_safely(auto_server):
    """The client glues the answer to a word, so its first tokens merge across the border: the
    prompt's ids differ from the captured ones, and the call is still served (as dense, or by
    reuse of a copy with those ids), never failed."""
    key = tenant()
    solver = post(auto_server, "/v1/chat/completions", chat_body(QUESTION, max_tokens=16), key)
    answer = solver["choices"][0]["message"]["content"]
    body = chat_body(QUESTION, f"solver answered:{answer}x", system=CRITIC)
    critic = post(auto_server, "/v1/chat/completions", body, key)
    dense = post(auto_server, "/v1/chat/completions", body, {**key, **OFF})
    assert critic["kvcomm"]["mode"] in ("dense", "reuse"), critic["kvcomm"]
    if critic["kvcomm"]["mode"] == "dense":
        assert critic["choices"][0]["message"]["content"] == \
            dense["choices"][0]["message"]["content"]
