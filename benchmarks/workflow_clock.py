"""A multi-agent workflow timed as its client sees it (shared by ttft_cpu.py and ttft_gpu.py).

Every request the workflow sends is on the clock: each agent's call (KVCOMM sends no base request:
the first agent's dense prefill computes the question, and the server keeps its KV as the
question's base); the next request goes out the moment the previous answer is complete (no
settle sleeps), so whatever the server does after an answer (KVCOMM's capture) lands where a
real client would meet it. The agents' template passes are sent once per namespace and timed
apart (``send_templates``). Per workflow:

* ``prefill_s``: the sum of the TTFTs of every request the workflow sent;
* ``e2e_s``: from the first request sent to the last answer decoded.

``Agents`` describes a workload: the agents' prompt builders, a short neutral prompt (the drain
request) and the template passes; ``run_workflow`` runs one question densely (plain requests, no namespace)
or with KVCOMM (hints, the workflow's namespace); ``run_concurrent`` starts many at once.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from kvcomm_sglang import protocol


@dataclass
class Call:
    """One streamed request: what it was, its client-side times and what came back."""

    kind: str                   # "template" | "agent" | "drain" | "hit" (a radix hit, untimed)
    agent: int | None
    input_ids: list
    ttft_s: float               # to the first streamed token
    done_s: float               # to the last one (the answer is complete)
    output_ids: list
    meta: dict

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def report(self) -> dict:
        """The server's KVCOMM report (``meta_info["kvcomm"][0]``), {} without one."""
        column = self.meta.get("kvcomm")
        return (column[0] if column else None) or {}

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the server computed: neither cached nor reused."""
        cached = self.meta.get("cached_tokens") or 0
        return max(self.prompt_tokens - cached, 0)


@dataclass
class Workflow:
    """The calls one workflow sent, in order, and its end-to-end time."""

    calls: list[Call] = field(default_factory=list)
    e2e_s: float = 0.0

    @property
    def prefill_s(self) -> float:
        return sum(c.ttft_s for c in self.calls)

    def agent_calls(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "agent"]


@dataclass
class Agents:
    """A workload: ``prompts[i](contents) -> (input_ids, layout)`` for agent i given
    {placeholder: (message id, ids)}; ``lead``: a short neutral prompt (drain requests);
    ``template_passes``: (agent id, input_ids, layout) of each agent's template pass."""

    prompts: list[Callable]
    lead: list[int]
    template_passes: list[tuple[str, list[int], list]]

    def __len__(self) -> int:
        return len(self.prompts)


def request(ids, new_tokens: int, hints=None, namespace=None) -> dict:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    if hints:
        params["custom_params"] = hints
    body = {"input_ids": list(ids), "sampling_params": params}
    if namespace:
        body["extra_key"] = namespace
    return body


def post(url: str, body: dict, timeout: float = 600) -> tuple[float, float, list, dict]:
    """-> (ttft_s, done_s, output_ids, meta_info) of one streamed request."""
    body = dict(body, stream=True)
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start, ttft, last = time.perf_counter(), None, None
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for line in resp:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            last = json.loads(line[5:])
            if "error" in last:
                raise RuntimeError(last["error"])
    if last is None:
        raise RuntimeError(f"{url}: no streamed output")
    return ttft, time.perf_counter() - start, list(last["output_ids"]), last["meta_info"]


def send(url: str, kind: str, agent: int | None, body: dict) -> Call:
    ttft, done, output, meta = post(url, body)
    return Call(kind, agent, body["input_ids"], ttft, done, output, meta)


def send_templates(url: str, agents: Agents, namespace: str) -> Workflow:
    """Each agent's template pass (once per namespace), back to back, on their own clock."""
    run, start = Workflow(), time.perf_counter()
    for agent, ids, layout in agents.template_passes:
        hints = protocol.encode(agent=agent, layout=layout, template=True)
        run.calls.append(send(url, "template", int(agent), request(ids, 1, hints, namespace)))
    run.e2e_s = time.perf_counter() - start
    return run


def run_workflow(url: str, agents: Agents, question: list[int], new_tokens: int, qid: str,
                 namespace: str | None = None) -> Workflow:
    """One question through every agent, each sent when the previous answer is complete.
    ``namespace`` None: dense (the same prompts as plain requests); else KVCOMM: every call
    with its hints (the first one computes the question densely, and the server keeps it)."""
    run, start = Workflow(), time.perf_counter()
    contents = {"user_question": (f"{qid}.q", list(question))}
    for i, prompt in enumerate(agents.prompts):
        ids, layout = prompt(contents)
        name = f"agent_{i}_current"
        hints = protocol.encode(agent=str(i), layout=layout, capture=(f"{qid}.a{i}", name)) \
            if namespace else None
        call = send(url, "agent", i, request(ids, new_tokens, hints, namespace))
        run.calls.append(call)
        contents[name] = (f"{qid}.a{i}", call.output_ids[:-1])
    run.e2e_s = time.perf_counter() - start
    return run


def radix_hits(url: str, dense: Workflow) -> list[Call]:
    """Each agent prompt of a dense workflow sent again (one token): SGLang's own radix hit of
    the same prompt, the floor a reused call is compared with. Not part of any workflow."""
    return [send(url, "hit", c.agent, request(c.input_ids, 1)) for c in dense.agent_calls()]


def run_concurrent(count: int, one: Callable[[int], Workflow]) -> tuple[float, list[Workflow]]:
    """``one(i)`` for i < count, all started at once (threads); -> (wall seconds until the last
    finished, the workflows). An exception in any of them is raised here."""
    results: list = [None] * count
    barrier = threading.Barrier(count + 1)

    def work(i):
        barrier.wait()
        try:
            results[i] = one(i)
        except Exception as exc:            # re-raised in the caller
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for r in results:
        if isinstance(r, Exception):
            raise r
    return wall, results


# ---- summaries ----
@dataclass
class AgentCalls:
    """One agent's timed calls over the measured rounds (``{"dense", "kvcomm", "hits"}``)."""

    dense: list
    kvcomm: list
    hits: list

    @property
    def reused(self) -> list:
        return [c for c in self.kvcomm if c.report.get("mode") == "reuse"]

    def reused_median(self, field_name: str):
        """The median of a report field over the reused calls (plan_ms, materialize_ms, ...)."""
        return median([c.report.get(field_name) for c in self.reused])

    def fallbacks(self) -> list[str]:
        return sorted({c.report["fallback_reason"] for c in self.kvcomm
                       if c.report.get("fallback_reason")})


def agent_calls(rounds: list[dict], agent: int) -> AgentCalls:
    return AgentCalls(
        [c for r in rounds for c in r["dense"].agent_calls() if c.agent == agent],
        [c for r in rounds for c in r["kvcomm"].agent_calls() if c.agent == agent],
        [c for r in rounds for c in r["hits"] if c.agent == agent])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, q: float):
    """Nearest-rank percentile (q in [0, 100]) of the non-None values; None when empty."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    rank = max(1, -(-len(values) * q // 100))
    return values[int(rank) - 1]


def workflow_block(dense: list[Workflow], kvcomm: list[Workflow],
                   templates: Workflow | None) -> dict:
    """The JSON ``workflow`` block: medians over the measured workflows, in ms."""
    ms = lambda xs: None if median(xs) is None else round(median(xs) * 1e3, 2)  # noqa: E731
    return {"dense_prefill_ms": ms([w.prefill_s for w in dense]),
            "kvcomm_prefill_ms": ms([w.prefill_s for w in kvcomm]),
            "dense_e2e_ms": ms([w.e2e_s for w in dense]),
            "kvcomm_e2e_ms": ms([w.e2e_s for w in kvcomm]),
            "prefill_speedup": _ratio(ms([w.prefill_s for w in dense]),
                                      ms([w.prefill_s for w in kvcomm])),
            "e2e_speedup": _ratio(ms([w.e2e_s for w in dense]), ms([w.e2e_s for w in kvcomm])),
            "kvcomm_template_passes_ms": (round(templates.prefill_s * 1e3, 2)
                                          if templates else None),
            "workflows": len(kvcomm), "sleeps": False,
            "counted": "prefill = sum of the TTFTs of every request a workflow sends (KVCOMM "
                       "sends no base request: the first agent computes the question); e2e = first request "
                       "sent to last answer decoded, each request sent when the previous answer "
                       "is complete; template passes: once per namespace, timed apart"}


def _ratio(a, b):
    return None if not a or not b else round(a / b, 3)
