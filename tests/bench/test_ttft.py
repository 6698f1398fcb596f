"""The TTFT benchmarks (ttft_gpu.py, ttft_cpu.py) against a real CPU server with tiny settings,
so that a GPU run does not fail on their logic: every request of a workflow is on its clock,
the JSON has the blocks the docs promise, the load mode's accounting adds up."""

import json
import os

import pytest

from benchmarks import ttft_cpu, ttft_gpu
from benchmarks import workflow_clock as wc
from tests.server.conftest import start_server

AGENT_KEYS = {"agent", "prompt_tokens", "dense_ms", "kvcomm_ms", "dense_radix_hit_ms",
              "p99_kvcomm_ms", "reuse_path_ms", "plan_ms", "materialize_ms", "forward_ms",
              "reused_calls", "calls"}
WORKFLOW_KEYS = {"dense_prefill_ms", "kvcomm_prefill_ms", "dense_e2e_ms", "kvcomm_e2e_ms",
                 "sleeps", "kvcomm_template_passes_ms"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One kvcomm server with the gate off (as the timing runs), checked for leaks and
    invariant violations when stopped."""
    saved = os.environ.get("KVCOMM_CONFIG")
    os.environ["KVCOMM_CONFIG"] = json.dumps({"gamma": 1.0})
    try:
        server = start_server(tmp_path_factory, "kvcomm")
    finally:
        if saved is None:
            del os.environ["KVCOMM_CONFIG"]
        else:
            os.environ["KVCOMM_CONFIG"] = saved
    yield server
    server.stop()


def test_gpu_benchmark_times_whole_workflows_and_load_on_the_cpu_server(server, tmp_path):
    out = tmp_path / "ttft-gpu.json"
    ttft_gpu.main(["--smoke", "--kvcomm-url", server.url, "--dense-url", server.url,
                   "--concurrent", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "date", "agents", "workflow", "load"} <= set(result)
    assert [a["agent"] for a in result["agents"]] == [1, 2, 3]
    for a in result["agents"]:
        assert AGENT_KEYS <= set(a), a
        # agent 1 computes each new question first (dense, no base request); two warm-up rounds
        # give every placeholder 2 anchors, so the later agents' timed calls reuse (a greedy
        # answer repeated across questions is one message, one anchor: it can cost a round)
        assert a["calls"] == 2, a
        if a["agent"] == 1:
            assert a["reused_calls"] == 0 and a["fallbacks"] == ["unknown_message"], a
            continue
        assert a["reused_calls"] >= 1 and a["reuse_path_ms"] > 0 and a["forward_ms"] > 0, a
    workflow = result["workflow"]
    assert WORKFLOW_KEYS <= set(workflow) and workflow["sleeps"] is False
    # the prefill is the sum of every request's TTFT (KVCOMM sends no base request)
    sums = {"dense": [], "kvcomm": []}
    for r in range(2):
        for mode, kinds in (("dense", ["agent"] * 3), ("kvcomm", ["agent"] * 3)):
            calls = [c for c in result["calls"] if c["round"] == r and c["workflow"] == mode]
            assert [c["kind"] for c in calls] == kinds, calls
            sums[mode].append(sum(c["ttft_s"] for c in calls) * 1e3)
    for mode in ("dense", "kvcomm"):
        assert workflow[f"{mode}_prefill_ms"] == pytest.approx(wc.median(sums[mode]), abs=0.01)
        assert workflow[f"{mode}_e2e_ms"] >= workflow[f"{mode}_prefill_ms"]
    load = result["load"]
    assert load["workflows"] == 3 and load["agent_calls"] == 9
    assert load["reuse_rate"] == load["reused_calls"] / 9
    assert load["dense_per_min"] > 0 and load["kvcomm_per_min"] > 0
    assert load["prefill_tokens_dense"] > 0 and load["prefill_tokens_kvcomm"] > 0
    assert [a["agent"] for a in load["ttft_per_agent"]] == [1, 2, 3]
    assert all(a["p99_kvcomm_ms"] >= a["p50_kvcomm_ms"] for a in load["ttft_per_agent"])


def test_cpu_benchmark_writes_per_agent_and_workflow_blocks(server, tmp_path):
    out = tmp_path / "ttft_cpu.json"
    result = ttft_cpu.main(["--url", server.url, "--warmup", "2", "--repeats", "1",
                            "--input-tokens", "40", "--new-tokens", "6", "--out", str(out)])
    assert json.loads(out.read_text())["workflow"] == result["workflow"]
    workflow = result["workflow"]
    assert {"dense_prefill_ms", "kvcomm_prefill_ms", "dense_e2e_ms", "kvcomm_e2e_ms"} <= \
        set(workflow) and workflow["sleeps"] is False
    [run] = result["workflows"]
    assert [c["kind"] for c in run["kvcomm"]["calls"]] == ["agent"] * 4
    assert workflow["kvcomm_prefill_ms"] == pytest.approx(
        sum(c["ttft_s"] for c in run["kvcomm"]["calls"]) * 1e3, abs=0.01)
    assert len(result["agents"]) == ttft_cpu.NUM_AGENTS
    assert result["agents"][0]["reused_calls"] == 0, result["agents"]   # computes the question
    assert result["agents"][-1]["reused_calls"] == 1, result["agents"]
