"""Auto mode across a restart (two CPU servers, one after the other, one anchor folder): a plain
client's tenant warms its application in one workflow; the server saves it when idle; after a
restart the first workflow of that tenant reuses for the agents that read earlier answers (the
first agent's call computes the new question, as always)."""

import time
from urllib.parse import urlparse

import requests

from benchmarks.applications import wait_saved
from tests.server import conftest as server_conftest
from tests.server.conftest import start_server

AGENTS = [("solver", "You are a careful math solver. Solve the problem step by step."),
          ("critic", "You are a critic. Check the solver's arithmetic and point out any mistake."),
          ("judge", "You are a judge. Read the discussion and state the final number.")]
WARM = ["Tom has 3 apples and buys 5 more. How many apples does he have now?",
        "A train travels 60 miles per hour for 2 hours. How far does it go?",
        "Sara had 12 candies and gave 4 to her friend. How many candies are left?",
        "A rope 15 meters long is cut into 3 equal pieces. How long is each piece?",
        "Lisa reads 10 pages a day. How many pages does she read in 6 days?"]
AFTER = "A bus has 30 seats and 18 are taken. How many seats are free?"   # no longer than WARM
KEY = {"Authorization": "Bearer restart-tenant"}


def one_question(url: str, question: str, workflow: str) -> list[dict]:
    earlier, reports = [], []
    for name, system in AGENTS:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        messages += [{"role": "user", "content": f"{n} answered:\n{a}"} for n, a in earlier]
        resp = requests.post(f"{url}/v1/chat/completions", headers=KEY, timeout=300, json={
            "model": "default", "messages": messages, "max_tokens": 16, "temperature": 0,
            "user": workflow})
        assert resp.status_code == 200, resp.text
        reports.append(resp.json()["kvcomm"])
        earlier.append((name, resp.json()["choices"][0]["message"]["content"]))
    return reports


def test_the_first_workflow_after_a_restart_reuses(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("auto-anchors")
    args = ["--kvcomm-auto", "--kvcomm-anchor-path", str(folder)]
    server = start_server(tmp_path_factory, "kvcomm", args)
    try:
        started = time.time()
        warm = [one_question(server.url, q, "warm") for q in WARM]
        wait_saved(folder, started)
    finally:
        server.stop()
    assert any(r["reused"] for reports in warm for r in reports), warm
    port = urlparse(server.url).port
    monkeypatch.setattr(server_conftest, "_free_port", lambda: port)
    server = start_server(tmp_path_factory, "kvcomm", args)
    try:
        after = one_question(server.url, AFTER, "after-restart")
    finally:
        server.stop()
    assert "restored application" in server.log_path.read_text()
    assert after[0]["fallback_reason"] == "unknown_message", after     # computes the question
    assert any(r["reused"] for r in after[1:]), after
