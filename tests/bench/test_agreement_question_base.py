"""benchmarks/agreement.py sends the question as the product does (no base request: the first
agent's call computes it, before the others), or with ``"question_base": "neutral"`` a base
request first; that key stays on the client. A producer's answer is stored only after its own
call (no server process here: ``gen`` is recorded)."""

import types

from benchmarks import agreement
from kvcomm_sglang import protocol

CALLS = [{"call": f"0.{a}", "question": 0, "agent": a, "ids": [1, 2, 3], "dense": [7, 8, 9],
          "layout": [{"kind": "template", "length": 3}]} for a in ("0", "1", "2", "3")]


def record(monkeypatch) -> list:
    sent = []

    def gen(url, ids, max_new_tokens, hints=None, namespace=None):
        decoded = protocol.decode(hints) if hints else None
        kind = "base" if decoded and decoded.base else decoded.agent if decoded else None
        sent.append(kind if not (decoded and decoded.base) else f"base:{decoded.base[0]}")
        return types.SimpleNamespace(kvcomm={"mode": "dense"}, output_ids=[5])

    monkeypatch.setattr(agreement, "gen", gen)
    monkeypatch.setattr(agreement, "parallel", lambda fn, items, workers: [fn(i) for i in items])
    return sent


def test_the_first_agent_computes_the_question_before_the_others(monkeypatch):
    sent = record(monkeypatch)
    rows = agreement.run_question("url", "ns", CALLS, 4)
    # each producer's answer is stored after its own call: sent before, the producer's exact
    # prompt would be in the radix tree and its call an exact hit instead of a reuse
    assert sent == ["0", "base:q0.a0", "1", "base:q0.a1", "2", "3"]
    assert [r["agent"] for r in rows] == ["0", "1", "2", "3"]


def test_neutral_mode_sends_the_question_base_request_first(monkeypatch):
    sent = record(monkeypatch)
    agreement.run_question("url", "ns", CALLS, 4, neutral=True)
    assert sent == ["base:q0.q", "0", "base:q0.a0", "1", "base:q0.a1", "2", "3"]


def test_client_keys_are_not_part_of_the_server_config():
    assert agreement.server_config(agreement.MODES["kvcomm_neutral_base"]) == {}
    assert agreement.server_config({"gamma": 1.0, "question_base": "neutral"}) == {"gamma": 1.0}
