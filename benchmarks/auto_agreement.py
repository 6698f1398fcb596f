"""Auto mode vs KVCommEndpoint on the same questions: agent-level reuse and same-call agreement.

One ``kvcomm-sglang serve --device cpu --kvcomm-auto`` server (started here, or ``--url``). The
same 3-agent loop (solver, critic, judge; each later agent's prompt holds the question and the
earlier answers as chat messages) runs twice on the same questions:

* **auto**: ``examples/openai_agents.py``'s plain ``openai`` calls; the server finds the spans;
* **endpoint**: the same messages as an ``@sgl.function`` through ``KVCommEndpoint``.

Every call is also sent densely with the very same prompt on the same server (auto: the same
messages with ``X-KVCOMM-Auto: off``; endpoint: the exact token ids it sent, without hints).
Reported per side, over its reused calls after ``--warmup`` questions: agreement of the first
token, the first 8 tokens and the whole answer with dense, and of the verdict (both contain the
expected answer, or neither). ``readers_reused``: the same over the calls that read earlier
answers (the critic and the judge; the solver's call is the first to hold each new question
and computes it, densely, on both sides). TTFTs are the client's (first streamed token,
template passes included). Writes bench-results/auto_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import secrets
import statistics
import sys
from collections import Counter

import requests
import sglang as sgl

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from kvcomm_sglang.frontend import KVCommEndpoint, workflow  # noqa: E402
from openai_agents import AGENTS, ask  # noqa: E402
from tests.harness.workflow import ANSWERS, QUESTIONS  # noqa: E402
from tests.server.workflow_client import tokenizer  # noqa: E402


class RecordingEndpoint(KVCommEndpoint):
    """KVCommEndpoint that remembers the token ids of its last hinted generation."""

    def _post(self, ids, params, hints, namespace, stream=False):
        if stream:
            self.last_ids = list(ids)
        return super()._post(ids, params, hints, namespace, stream)


@sgl.function
def agent_call(s, question, system, earlier, max_tokens):
    s += sgl.system(system)
    s += sgl.user(question)
    for name, answer in earlier:
        s += sgl.user(f"{name} answered:\n{answer}")
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))


def run_auto(url, questions, max_tokens):
    from openai import OpenAI

    # a tenant of its own (the API key is part of it): no anchors from earlier runs
    client = OpenAI(base_url=f"{url}/v1", api_key=f"bench-{secrets.token_urlsafe(8)}")
    calls = []
    for q, question in enumerate(questions):
        earlier = []
        for name, system in AGENTS:
            text, ttft, kvcomm, _ = ask(client, system, question, earlier, max_tokens, "bench")
            dense, *_ = ask(client, system, question, earlier, max_tokens, "bench",
                            headers={"X-KVCOMM-Auto": "off"})
            calls.append(call_row(q, name, kvcomm.get("reused", False), ttft, text, dense,
                                  kvcomm.get("fallback_reason")))
            earlier.append((name, text))
    return calls


def run_endpoint(url, questions, max_tokens):
    endpoint, calls = RecordingEndpoint(url), []
    with workflow("bench-endpoint") as wf:
        for q, question in enumerate(questions):
            earlier = []
            for name, system in AGENTS:
                state = agent_call.run(question=question, system=system, earlier=earlier,
                                       max_tokens=max_tokens, backend=endpoint)
                state.sync()
                if state.error() is not None:
                    raise RuntimeError(f"question {q}, {name}: {state.error()}")
                record = wf.calls[-1]
                dense = requests.post(f"{url}/generate", json={
                    "input_ids": endpoint.last_ids, "sampling_params": {
                        "max_new_tokens": max_tokens, "temperature": 0}}).json()["text"]
                calls.append(call_row(q, name, record.mode == "reuse", record.ttft_s,
                                      state["answer"], dense, record.fallback_reason))
                earlier.append((name, state["answer"]))
    return calls


def call_row(q, agent, reused, ttft, text, dense, reason) -> dict:
    tok = tokenizer()
    ids, dense_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (text, dense))
    right = [ANSWERS[q].lower() in t.lower() for t in (text, dense)]
    return {"question": q, "agent": agent, "reused": reused, "reason": reason, "ttft_s": ttft,
            "first_token": ids[:1] == dense_ids[:1], "first_8": ids[:8] == dense_ids[:8],
            "whole": text == dense, "verdict": right[0] == right[1]}


def summary(calls, warmup) -> dict:
    counted = [c for c in calls if c["question"] >= warmup]
    reused = [c for c in counted if c["reused"]]
    readers = [c for c in counted if c["agent"] != AGENTS[0][0]]
    out = {"calls": len(counted), "reused": len(reused),
           "reuse_rate": len(reused) / max(len(counted), 1),
           "readers_reused": f"{sum(c['reused'] for c in readers)}/{len(readers)}",
           "fallbacks": dict(Counter(c["reason"] for c in counted if not c["reused"])),
           "median_ttft_s": statistics.median(c["ttft_s"] for c in counted) if counted else None}
    for key in ("first_token", "first_8", "whole", "verdict"):
        out[key] = sum(c[key] for c in reused) / max(len(reused), 1)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running --kvcomm-auto server (default: start one)")
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sides", default="auto,endpoint")
    parser.add_argument("--out", default="bench-results/auto_agreement.json")
    args = parser.parse_args(argv)
    questions = QUESTIONS[:args.questions]
    server = None
    if args.url is None:
        from kvcomm_sglang.runtime_patch.process import ServerProcess

        server = ServerProcess(["--device", "cpu", "--kvcomm-auto"]).__enter__()
    try:
        url = args.url or server.url
        sides = {"auto": run_auto, "endpoint": run_endpoint}
        result = {name: sides[name](url, questions, args.max_tokens)
                  for name in args.sides.split(",")}
    finally:
        if server is not None:
            server.stop()
    report = {"questions": args.questions, "warmup": args.warmup, "max_tokens": args.max_tokens,
              **{name: summary(calls, args.warmup) for name, calls in result.items()},
              "calls": result}
    print(f"{'side':<10}{'reused':>10}{'rate':>7}{'readers':>9}{'1st tok':>9}{'8 tok':>7}"
          f"{'whole':>7}{'verdict':>9}{'TTFT s':>8}  fallbacks")
    for name in result:
        s = report[name]
        print(f"{name:<10}{s['reused']:>5}/{s['calls']:<4}{s['reuse_rate']:>7.0%}"
              f"{s['readers_reused']:>9}{s['first_token']:>9.0%}{s['first_8']:>7.0%}"
              f"{s['whole']:>7.0%}{s['verdict']:>9.0%}{s['median_ttft_s']:>8.2f}  {s['fallbacks']}")
    pathlib.Path(args.out).parent.mkdir(exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
