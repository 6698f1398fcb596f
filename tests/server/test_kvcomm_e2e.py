"""KVCOMM inside a real SGLang 0.5.17 server on CPU (SmolLM2-135M): the 3-agent workflow through
/generate with KVCOMM hints, exactness for plain traffic, HTTP 400s, a small pool, metrics."""

import json

import pytest
import requests

from kvcomm_sglang import protocol
from tests.harness import workflow
from tests.server.conftest import start_server
from tests.server.workflow_client import Workflow, encode, generate

NUM_QUESTIONS = 5


@pytest.fixture(scope="module")
def workflow_runs(kvcomm_server):
    wf = Workflow(kvcomm_server.url, "e2e", max_new_tokens=24)
    return [wf.run(f"q{i}", workflow.QUESTIONS[i], dense_url=kvcomm_server.url)
            for i in range(NUM_QUESTIONS)]


def test_workflow_is_served_by_reuse_after_warmup(workflow_runs):
    calls = [(q, agent, r, d, n) for q, run in enumerate(workflow_runs) for agent, r, d, n in run]
    for q, agent, r, d, n in calls:
        report = r.kvcomm
        assert report is not None, "meta_info carries no kvcomm report"
        if q < 2:       # anchors warm up: fewer than 2 anchors -> dense, with the reason
            assert report["mode"] == "dense"
            assert report["fallback_reason"].startswith("new_anchor")
    reused = [c for c in calls if c[2].kvcomm["mode"] == "reuse"]
    assert len(reused) >= 3, [c[2].kvcomm for c in calls]
    for q, agent, r, d, n in reused:
        # the device-matched prefix is a radix hit, the rest reused but the last token
        assert 0 < r.kvcomm["reused_tokens"] <= r.meta["cached_tokens"] <= n - 1
        timing = r.kvcomm["plan_ms"], r.kvcomm["materialize_ms"], r.kvcomm["reuse_path_ms"]
        assert all(t >= 0 for t in timing) and timing[2] > 0
        assert abs(timing[0] + timing[1] - timing[2]) < 0.01
        assert 0 < r.kvcomm["flatten_ms"] <= timing[1]
    agree = sum(r.output_ids == d.output_ids for _, _, r, d, _ in reused) / len(reused)
    assert agree >= 0.6, f"only {agree:.0%} of reused calls agree with dense"


def test_dense_fallbacks_are_exact(workflow_runs):
    dense = [(r, d) for run in workflow_runs for _, r, d, _ in run if r.kvcomm["mode"] == "dense"]
    assert dense
    assert all(r.output_ids == d.output_ids for r, d in dense)


PLAIN_PROMPTS = ["What is the capital of France?", "Write one short tip about sleep.",
                 "Name three colors."]


def plain_outputs(url):
    out = []
    for text in PLAIN_PROMPTS + PLAIN_PROMPTS:        # twice: the second round hits the cache
        resp = requests.post(f"{url}/generate", json={
            "text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 16}}, timeout=120)
        resp.raise_for_status()
        out.append(resp.json()["output_ids"])
    return out


def test_requests_without_hints_are_bit_identical_to_vanilla(kvcomm_server, vanilla_server,
                                                              workflow_runs):
    assert plain_outputs(kvcomm_server.url) == plain_outputs(vanilla_server.url)


BAD = [
    ({"kvcomm": "{not json"}, "not valid JSON"),
    ({"kvcomm": json.dumps({"v": 2})}, "version"),
    ({"kvcomm": json.dumps({"v": 1, "surprise": 1})}, "unknown KVCOMM hint fields"),
    ({"kvcomm": json.dumps({"v": 1, "agent": "0", "layout": [{"t": "template", "n": 3}]})},
     "sum to"),
    ({"kvcomm": json.dumps({"v": 1, "agent": "0", "layout": [
        {"t": "template", "n": 2}, {"t": "content", "n": 1, "ph": "agent_x_y", "id": "a"},
        {"t": "template", "n": 2}]})}, "unknown placeholder"),
    ({"kvcomm": "x" * (protocol.MAX_PAYLOAD_BYTES + 1)}, "bytes"),
]


@pytest.mark.parametrize("custom,reason", BAD, ids=[b[1] for b in BAD])
def test_bad_hints_get_400_and_the_server_keeps_serving(kvcomm_server, custom, reason):
    body = {"input_ids": [1, 2, 3, 4, 5], "extra_key": "kvcomm:" + "bad" * 8,
            "sampling_params": {"temperature": 0, "max_new_tokens": 2, "custom_params": custom}}
    resp = requests.post(f"{kvcomm_server.url}/generate", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert reason in resp.text
    ok = generate(kvcomm_server.url, [1, 2, 3, 4, 5], 2)
    assert len(ok.output_ids) == 2


def test_hints_need_a_kvcomm_namespace(kvcomm_server):
    hints = protocol.encode(base=("m", "user_question", 1))
    with pytest.raises(requests.HTTPError, match="400.*extra_key"):
        generate(kvcomm_server.url, [1, 2, 3], 1, hints, namespace=None)


def test_small_pool_evicts_the_store_without_leaks(tmp_path_factory):
    server = start_server(tmp_path_factory, "kvcomm", ["--max-total-tokens", "700",
                                                       "--enable-metrics"])
    try:
        wf = Workflow(server.url, "small", max_new_tokens=16)
        runs = [wf.run(f"s{i}", workflow.QUESTIONS[i]) for i in range(6)]
        assert all(r.kvcomm is not None for run in runs for _, r, _, _ in run)
        metrics = requests.get(f"{server.url}/metrics", timeout=30).text
        assert "kvcomm_agent_calls_total" in metrics and "kvcomm_store_bytes" in metrics
    finally:
        server.stop()          # raises if SGLang's strict idle check reported a leak
