"""Auto mode sends no base requests (CPU server): new shared input is computed by the first call
that holds it, which the server keeps as its base KV; concurrent calls of one workflow do not
wait on each other (no workflow lock; only an agent's first calls share its template pass)."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

SOLVER = "You are a careful math solver. Solve the problem step by step."
CRITIC = "You are a critic. Check the solver's arithmetic and point out any mistake."
QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have now?",
             "A train travels 60 miles per hour for 2 hours. How far does it go?",
             "Sara had 12 candies and gave 4 to her friend. How many candies are left?"]


@pytest.fixture(scope="module")
def auto_server(server_factory):
    return server_factory("kvcomm", ["--kvcomm-auto"])


def ask(server, key, system, *contents, max_tokens=12) -> dict:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": c} for c in contents]
    resp = requests.post(f"{server.url}/v1/chat/completions", timeout=300, headers=key, json={
        "model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "user": "first-computed"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def tenant() -> dict:
    return {"Authorization": f"Bearer first-{secrets.token_urlsafe(6)}"}


def test_the_first_call_holding_the_question_computes_it_for_the_next(auto_server):
    key = tenant()
    solver = ask(auto_server, key, SOLVER, QUESTIONS[0])
    report = solver["kvcomm"]
    assert report["first_computed"] == 1 and report["template_pass"], report
    assert report["fallback_reason"] == "unknown_message", report   # dense: computed here
    answer = solver["choices"][0]["message"]["content"]
    critic = ask(auto_server, key, CRITIC, QUESTIONS[0], f"solver answered:\n{answer}")
    assert critic["kvcomm"]["first_computed"] == 0, critic["kvcomm"]
    assert critic["kvcomm"]["fallback_reason"] != "unknown_message", critic["kvcomm"]


def test_concurrent_first_calls_of_one_workflow_are_all_served(auto_server):
    """Three solver calls of one workflow at once, each with a new question: each computes
    its own question, all share the agent's one template pass; then each question is held."""
    key = tenant()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        first = list(pool.map(lambda q: ask(auto_server, key, SOLVER, q), QUESTIONS))
    for resp in first:
        assert resp["kvcomm"]["first_computed"] == 1 and resp["choices"][0]["message"]["content"]
    again = [ask(auto_server, key, SOLVER, q)["kvcomm"] for q in QUESTIONS]
    assert all(r["first_computed"] == 0 and r["fallback_reason"] not in (
        "unknown_message", "unknown_template") for r in again), again
