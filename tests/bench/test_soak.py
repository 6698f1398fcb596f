"""benchmarks/soak.py: its verdict, its metric reader, its hostile requests, and a short soak of a
real CPU server (4 workflows, 40 s) that must end with zero faults."""

import http.server
import json
import random
import re
import socket
import subprocess
import sys
import threading

import pytest

from benchmarks import soak
from benchmarks.soak_client import (ABORT_AFTER_FIRST, ABORT_BEFORE, ABORTED, BROKEN, CONN_ERROR,
                                    Outcome, by_label, parse_metrics, send, total)
from benchmarks.soak_traffic import HOSTILE, Tally, hostile_request
from benchmarks.ttft_gpu import Workload
from kvcomm_sglang import protocol

METRICS = """\
# HELP kvcomm_store_bytes Bytes held by the segment store
# TYPE kvcomm_store_bytes gauge
kvcomm_store_bytes{pid="11",tp_rank="0"} 1000.0
kvcomm_store_bytes{pid="12",tp_rank="1"} 24.0
kvcomm_fallbacks_total{reason="unknown_message",tp_rank="0"} 3.0
kvcomm_fallbacks_total{reason="unknown_message",tp_rank="1"} 2.0
kvcomm_fallbacks_total{reason="new_anchor",tp_rank="0"} 1.0
sglang:num_retracted_reqs{model_name="/m/a \\"b\\"",tp_rank="0"} 0.0
"""


def test_metrics_are_summed_over_label_sets():
    samples = parse_metrics(METRICS)
    assert total(samples, "kvcomm_store_bytes") == 1024.0
    assert total(samples, "kvcomm_leaked_slots") is None
    assert by_label(samples, "kvcomm_fallbacks_total", "reason") == {"unknown_message": 5.0,
                                                                      "new_anchor": 1.0}
    assert samples["sglang:num_retracted_reqs"][0][0]["model_name"] == '/m/a \\"b\\"'


def clean_result(**changes) -> dict:
    result = {key: 0 for key in soak.ZERO_COUNTS}
    result.update(missing_metrics=[], invariant_checks=7, server_alive=True, max_store_bytes=10.0,
                  budget_bytes=10.0, agent_calls=5)
    result.update(changes)
    return result


def test_a_clean_run_passes_and_every_fault_fails_it():
    assert soak.failures(clean_result()) == []
    for key in soak.ZERO_COUNTS:
        assert soak.failures(clean_result(**{key: 1})) == [f"{key} = 1"]
    assert "exceed the budget" in soak.failures(clean_result(max_store_bytes=11.0))[0]
    assert soak.failures(clean_result(server_alive=False))
    assert "never ran" in soak.failures(clean_result(invariant_checks=0))[0]
    assert soak.failures(clean_result(agent_calls=0))


def test_missing_metrics_fail_the_run():
    samples = parse_metrics(METRICS)
    counts = soak.metric_counts(samples, soak.StoreSampler("http://unused", 1.0))
    assert set(counts["missing_metrics"]) == set(soak.REQUIRED_METRICS) - {"kvcomm_store_bytes"}
    result = clean_result(**{k: counts[k] for k in ("missing_metrics", "lost_anchors",
                                                    "leaked_slots", "invariant_violations")})
    assert [f for f in soak.failures(result) if "missing" in f] == [
        f"metric {m} is missing from /metrics" for m in counts["missing_metrics"]]


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert soak.percentile(values, 0.5) == 50.0 and soak.percentile(values, 0.99) == 99.0
    assert soak.percentile([3.0], 0.99) == 3.0 and soak.percentile([], 0.5) is None


@pytest.fixture(scope="module")
def agent_call():
    work = Workload(3, 8, (100, 1000), seed=1)
    agent, pieces, names = work.agents[2]
    contents = {name: (f"m{i}", work.ids(5)) for i, name in enumerate(names)}
    ids, layout = work.prompt(pieces, names, contents)
    return agent, ids, layout


NAMESPACE = re.compile(r"kvcomm:[A-Za-z0-9_-]{22,128}")   # the namespace contract


def refused(body: dict) -> bool:
    """Would the protocol's checks, the namespace rule or the token-id range refuse this?"""
    ids = body["input_ids"]
    if any(not 0 <= i < 1000 for i in ids):
        return True
    try:
        hints = protocol.decode(body["sampling_params"].get("custom_params"))
        if hints is not None:
            protocol.validate(hints, len(ids), body.get("extra_key"))
    except (ValueError, RecursionError):
        return True
    return hints is not None and not NAMESPACE.fullmatch(body.get("extra_key", ""))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_requests_are_what_they_claim(agent_call, kind):
    agent, ids, layout = agent_call
    namespace = "kvcomm:" + "S" * 22
    assert not refused({"input_ids": ids, "extra_key": namespace, "sampling_params": {
        "custom_params": protocol.encode(agent=agent, layout=layout)}})
    for seed in range(20):
        body = hostile_request(kind, ids, layout, agent, namespace, random.Random(seed))
        assert refused(body) == HOSTILE[kind], (kind, seed, json.dumps(body)[:300])


def test_short_soak_of_a_cpu_server_ends_with_zero_faults(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "benchmarks/soak.py", "--workflows", "4",
                          "--duration", "40", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert out.exists(), f"no result (rc={run.returncode}):\n{run.stdout}\n{run.stderr[-3000:]}"
    result = json.loads(out.read_text())
    for key in ("invariant_violations", "lost_anchors", "leaked_slots", "errors_5xx",
                "idle_leak_reports", "unexpected_4xx", "hostile_not_refused"):
        assert result[key] == 0, (key, result["failures"], result["fault_examples"])
    assert result["missing_metrics"] == [] and result["server_alive"]
    assert result["max_store_bytes"] <= result["budget_bytes"]
    assert result["agent_calls"] > 0 and result["aborted"] > 0 and result["plain"] > 0 \
        and result["hostile"] > 0, result["statuses"]
    assert run.returncode == 0 and result["failures"] == [], run.stdout


@pytest.mark.parametrize("category,status,fault", [
    ("agent", 200, None), ("agent", 500, "errors_5xx"), ("base", "broken", "errors_5xx"),
    ("plain", "conn_error", "errors_5xx"), ("abort", "aborted", None),
    ("template", 400, "unexpected_4xx"), ("abort", 400, "unexpected_4xx"),
    ("hostile:oov_token", 400, None), ("hostile:oov_token", 200, "hostile_not_refused"),
    ("hostile:deep_nesting", 500, "errors_5xx"), ("hostile:unknown_message", 200, None)])
def test_tally_sorts_each_response_into_its_fault(category, status, fault):
    tally = Tally()
    tally.add(category, Outcome(status, detail="why"))
    assert dict(tally.faults) == ({fault: 1} if fault else {})
    assert tally.count() == 1 and tally.statuses[(category, status)] == 1


STREAMS = {   # what the stub server answers to {"stream": true, "case": ...}
    "done": b'data: {"output_ids": [5], "meta_info": {}}\n\ndata: {"output_ids": [5, 6], '
            b'"meta_info": {"kvcomm": [{"mode": "reuse"}]}}\n\ndata: [DONE]\n\n',
    "cut": b'data: {"output_ids": [5], "meta_info": {}}\n\n',
    "error": b'data: {"error": {"message": "bad ids", "code": 400}}\n\ndata: [DONE]\n\n',
}


class StubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"          # the body ends when the connection closes

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        refuse = body["case"] == "refuse"
        try:
            self.send_response(400 if refuse else 200)
            self.end_headers()
            self.wfile.write(b'{"error": "no"}' if refuse else STREAMS[body["case"]])
        except (BrokenPipeError, ConnectionResetError):
            pass                            # the client hung up on purpose (an abort)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_send_reads_each_ending_of_a_stream(stub_url):
    done = send(stub_url, {"stream": True, "case": "done"})
    assert done.ok and done.output_ids == [5, 6] and done.report == {"mode": "reuse"}
    assert done.ttft_s is not None and not done.is_server_error
    assert send(stub_url, {"stream": True, "case": "cut"}).status == BROKEN
    error = send(stub_url, {"stream": True, "case": "error"})
    assert error.status == 400 and error.detail == "bad ids" and not error.is_server_error
    assert send(stub_url, {"stream": False, "case": "refuse"}).status == 400
    assert send(stub_url, {"stream": True, "case": "done"}, abort=ABORT_AFTER_FIRST).status \
        == ABORTED
    assert send(stub_url, {"stream": True, "case": "done"}, abort=ABORT_BEFORE).status == ABORTED


def test_a_server_that_is_gone_is_a_server_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]            # bound, not listening: connections are refused
        outcome = send(f"http://127.0.0.1:{port}", {"stream": True})
    assert outcome.status == CONN_ERROR and outcome.is_server_error
