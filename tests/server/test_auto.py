"""``kvcomm-sglang serve --kvcomm-auto`` against plain clients (one CPU server for the module):
examples/openai_agents.py (the plain ``openai`` package) gets reuse after warm-up for the
agents that read earlier answers (the first agent's call computes each new question); streaming,
``n`` > 1, logprobs, tools, /v1/completions and /generate keep working; tenants are apart."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
LINE = re.compile(r"q(\d+) (\w+) +reused=(True|False) +reused_tokens=(\d+) +cached_tokens=(\d+) "
                  r"+TTFT ([\d.]+) s")
SYSTEM = "You are a careful math solver. Solve the problem step by step."
QUESTION = "A box holds 6 eggs. How many eggs are in 4 boxes?"


@pytest.fixture(scope="module")
def auto_server(server_factory):
    return server_factory("kvcomm", ["--kvcomm-auto"])


@pytest.fixture(scope="module")
def example_lines(auto_server):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "openai_agents.py"), "--base-url",
         f"{auto_server.url}/v1", "--questions", "5", "--warmup", "3", "--max-tokens", "16"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def chat(server, messages, headers=None, **params):
    body = {"model": "default", "messages": messages, "max_tokens": 8, "temperature": 0, **params}
    resp = requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers,
                         timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_the_plain_openai_example_is_served_by_reuse(example_lines):
    calls = [LINE.match(line) for line in example_lines if line.startswith("q")]
    assert len(calls) == 15 and all(calls), example_lines
    late = [m for m in calls if int(m[1]) > 3]
    reused = [m[2] for m in late if m[3] == "True"]
    assert {"critic", "judge"} & set(reused), example_lines
    solvers = [line for line in example_lines if line.split()[1:2] == ["solver"]]
    assert all(line.endswith("unknown_message") for line in solvers), solvers   # computed there
    for m in calls:
        reused, tokens, cached = m[3] == "True", int(m[4]), int(m[5])
        assert (tokens > 0) == reused and cached >= tokens      # cached_tokens counts reuse
    assert any("agent-level reuse" in line for line in example_lines)


def test_response_fields_streaming_and_the_opt_out(auto_server, example_lines):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    plain = chat(auto_server, messages, user="openai-agents-example")
    report = plain["kvcomm"]
    assert set(report) >= {"mode", "reused", "reused_tokens", "fallback_reason"}
    cached = (plain["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert cached >= report["reused_tokens"]
    off = chat(auto_server, messages, headers={"X-KVCOMM-Auto": "off"})
    assert "kvcomm" not in off
    with requests.post(f"{auto_server.url}/v1/chat/completions", stream=True, timeout=300, json={
            "model": "default", "messages": messages, "max_tokens": 8, "temperature": 0,
            "stream": True}) as resp:
        chunks = [line for line in resp.iter_lines() if line.startswith(b"data: {")]
    assert b'"kvcomm"' in chunks[0] and not any(b'"kvcomm"' in c for c in chunks[1:])


def test_n_logprobs_tools_completions_and_generate_keep_working(auto_server):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    two = chat(auto_server, messages, n=2, temperature=0.7)
    assert len(two["choices"]) == 2 and "kvcomm" not in two
    logprobs = chat(auto_server, messages, logprobs=True, top_logprobs=2)
    assert logprobs["choices"][0]["logprobs"]["content"]
    assert logprobs["kvcomm"]["mode"] == "dense"
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                             "parameters": {"type": "object", "properties": {
                                                 "a": {"type": "number"}}}}}
    assert chat(auto_server, messages, tools=[tool])["choices"][0]["message"] is not None
    done = requests.post(f"{auto_server.url}/v1/completions", timeout=300, json={
        "model": "default", "prompt": "Question: " + QUESTION + "\nAnswer:", "max_tokens": 8,
        "temperature": 0}).json()
    assert done["choices"][0]["text"] and "kvcomm" in done
    out = requests.post(f"{auto_server.url}/generate", timeout=300, json={
        "text": "Question: " + QUESTION + "\nAnswer:", "sampling_params": {
            "max_new_tokens": 8, "temperature": 0}}).json()
    assert out["meta_info"]["kvcomm_auto"]["mode"] in ("reuse", "dense")
    too_long = requests.post(f"{auto_server.url}/v1/chat/completions", timeout=300, json={
        "model": "default", "messages": messages, "max_tokens": 4, "user": "x" * 300})
    assert too_long.status_code == 400 and "workflow id" in too_long.text


def test_another_api_key_is_another_tenant(auto_server, example_lines):
    """The example's tenant (its key, "none") has anchors for the solver's prompt of question 4;
    the very same call with another key finds none, nor the question: tenants share
    nothing."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    def send(key):
        return chat(auto_server, messages, headers={"Authorization": f"Bearer {key}"},
                    user="openai-agents-example")["kvcomm"]

    reports = {key: send(key) for key in ("none", "another-tenant")}
    assert reports["none"]["mode"] == "reuse" or \
        reports["none"]["fallback_reason"] == "new_anchor:ambiguous", reports
    # the other tenant's first call computes the question (unknown_message); its second call
    # holds it and is planned: no anchor of the first tenant may serve it
    assert reports["another-tenant"]["fallback_reason"] == "unknown_message", reports
    again = send("another-tenant")
    assert again["mode"] == "dense" and again["fallback_reason"] in (
        "new_anchor:too_few_anchors", "no_anchor_for_consumer"), again
