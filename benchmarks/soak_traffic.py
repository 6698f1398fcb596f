"""The soak's traffic: multi-agent workflows (KVCOMM protocol v1, docs/protocol.md) with aborted
streams, plain requests and hostile requests interleaved, and the tally of every response.

A workflow thread opens a fresh secret workflow namespace of its application
(``kvcomm:<application>.<workflow>``: the threads share ``--applications`` applications, so
their agents' templates and anchors are shared and reuse happens under load, as in a service
that starts one workflow per user question), registers its agents' templates, then runs
questions: a base request for the question, then the agents in order, each prompt holding the
question and the earlier agents' answers (token ids, as ``benchmarks/ttft_gpu.py``'s workload,
so no tokenizer is needed and any model's server can be soaked). Before each agent call it may
send one extra request built from that call: the same call aborted, the same prompt plain (no
hints, no namespace), or a hostile variant.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from collections import Counter

from benchmarks.soak_client import ABORT_AFTER_FIRST, ABORT_BEFORE, Outcome, send
from benchmarks.ttft_gpu import Workload, request
from kvcomm_sglang import protocol

NUM_AGENTS = 3
FAILURE_PAUSE_S = 1.0               # after a failed step: no busy loop on a dead server
EXTRAS = ("abort", "plain", "hostile")
OUT_OF_VOCAB = 10**9
MALFORMED = (                                      # custom_params["kvcomm"] values
    "{not json", json.dumps({"v": 2}), json.dumps({"v": 1, "surprise": 1}),
    json.dumps({"v": 1, "agent": "0", "layout": {"t": "template"}}),
    json.dumps({"v": 1, "agent": "0", "layout": [{"t": "template", "n": -5}]}),
    json.dumps({"v": 1, "agent": "0", "layout": [{"t": "template", "n": 1.5}]}),
    json.dumps({"v": 1, "agent": "0", "layout": [{"t": "template", "n": True}]}),
    json.dumps({"v": 1, "agent": "0", "layout": [{"t": "template", "n": 10**30}]}),
    json.dumps({"v": 1, "agent": "\u00fcn\u00efcode \ud800"}), 5, None, [1, 2],
)
# hostile kind -> must the server refuse it with a 4xx? (an unknown message is served densely)
HOSTILE = {"malformed": True, "deep_nesting": True, "oov_token": True, "negative_token": True,
           "bad_namespace": True, "layout_mismatch": True, "unknown_message": False}


class Tally:
    """Every response, by category and status, shared by all threads; and the faults among them:
    ``errors_5xx`` (5xx, cut streams, refused or hanging connections), ``unexpected_4xx`` (a
    valid request refused) and ``hostile_not_refused`` (a request that must get a 4xx got 200)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()            # (category, status) -> n
        self.faults: Counter = Counter()
        self.ttfts: list[float] = []                  # streamed agent calls answered in full
        self.modes: Counter = Counter()               # agent calls by KVCOMM report mode
        self.retractions = 0                          # sum of meta_info num_retractions
        self.examples: dict[str, str] = {}            # first detail of each fault
        self.namespaces = self.questions = 0

    def add(self, category: str, outcome: Outcome) -> Outcome:
        fault = _fault(category, outcome)
        with self.lock:
            self.statuses[(category, outcome.status)] += 1
            self.retractions += int(outcome.meta.get("num_retractions") or 0)
            if category == "agent" and outcome.ok:
                self.ttfts.append(outcome.ttft_s)
                self.modes[outcome.report.get("mode", "none")] += 1
            if fault:
                self.faults[fault] += 1
                self.examples.setdefault(f"{category}:{outcome.status}", outcome.detail)
        return outcome

    def count(self, category_prefix: str = "") -> int:
        with self.lock:
            return sum(n for (c, _), n in self.statuses.items() if c.startswith(category_prefix))


def _fault(category: str, outcome: Outcome) -> str | None:
    if outcome.is_server_error:
        return "errors_5xx"
    hostile = category.removeprefix("hostile:") if category.startswith("hostile:") else None
    if hostile is None and isinstance(outcome.status, int) and outcome.status >= 400:
        return "unexpected_4xx"
    if hostile is not None and HOSTILE[hostile] and outcome.ok:
        return "hostile_not_refused"
    return None


class WorkflowLoop:
    """One thread's workflows, back to back until ``deadline`` (time.monotonic())."""

    def __init__(self, url: str, index: int, args, tally: Tally, deadline: float,
                 application: tuple[int, str] = (0, "")):
        """``application`` = (index, secret): threads of one application send the same agent
        templates (seeded by its index) under ``kvcomm:<secret>.<workflow>``; an empty secret
        makes every workflow its own application."""
        self.url, self.args, self.tally, self.deadline = url, args, tally, deadline
        self.rng = random.Random(args.seed * 1000 + index)
        app_index, self.app_secret = application
        self.work = Workload(NUM_AGENTS, args.prefix_tokens, (100, args.vocab_max),
                             seed=args.seed * 1000 + app_index)
        self.work.rng = random.Random(args.seed * 1000 + index)     # this thread's questions
        self.namespace = ""

    def run(self) -> None:
        """Workflows until the deadline; the first question is always asked (a slow server
        still gets one whole workflow from every thread)."""
        asked = False
        while not asked or time.monotonic() < self.deadline:
            self.namespace = new_namespace(self.app_secret)
            with self.tally.lock:
                self.tally.namespaces += 1
            if not self.register_templates():
                time.sleep(FAILURE_PAUSE_S)
                asked = True                        # no endless retries on a failing server
                continue
            for q in range(self.args.questions_per_workflow):
                if asked and time.monotonic() >= self.deadline:
                    return
                asked = True
                if not self.question(f"q{q}"):
                    time.sleep(FAILURE_PAUSE_S)
                    continue
                with self.tally.lock:
                    self.tally.questions += 1

    def post(self, category: str, body: dict, **abort) -> Outcome:
        return self.tally.add(category, send(self.url, body, timeout=self.args.timeout_s,
                                             **abort))

    def register_templates(self) -> bool:
        for agent, pieces, names in self.work.agents:
            standins = {name: ("standin", self.work.ids(16)) for name in names}
            ids, layout = self.work.prompt(pieces, names, standins)
            hints = protocol.encode(agent=agent, layout=layout, template=True)
            if not self.post("template", streamed(ids, 1, hints, self.namespace)).ok:
                return False
        return True

    def question(self, qid: str) -> bool:
        """Base request, then every agent in order; False when a call failed (question left)."""
        lead, question = self.work.ids(8), self.work.ids(self.args.question_tokens)
        base = protocol.encode(base=(f"{qid}.q", "user_question", len(lead)))
        if not self.post("base", streamed(lead + question, 1, base, self.namespace)).ok:
            return False
        contents = {"user_question": (f"{qid}.q", question)}
        for agent, pieces, names in self.work.agents:
            ids, layout = self.work.prompt(pieces, names, contents)
            if self.rng.random() < self.args.extra_rate:
                self.extra(qid, agent, ids, layout)
            name = f"agent_{agent}_current"
            hints = protocol.encode(agent=agent, layout=layout, capture=(f"{qid}.a{agent}", name))
            answer = self.post("agent", streamed(ids, self.args.new_tokens, hints, self.namespace))
            if not answer.ok:
                return False
            contents[name] = (f"{qid}.a{agent}", answer.output_ids[:-1])
        return True

    def extra(self, qid: str, agent: str, ids: list[int], layout: list) -> None:
        kind = self.rng.choice(EXTRAS)
        if kind == "plain":
            self.post("plain", streamed(ids, 8))
        elif kind == "abort":
            capture = (f"{qid}.x{agent}", f"agent_{agent}_current")
            hints = protocol.encode(agent=agent, layout=layout, capture=capture)
            mode = self.rng.choice((ABORT_BEFORE, ABORT_AFTER_FIRST))
            self.post("abort", streamed(ids, self.args.new_tokens, hints, self.namespace),
                      abort=mode, abort_delay_s=self.rng.uniform(0, 0.5))
        else:
            hostile = self.rng.choice(self.args.hostile)
            body = hostile_request(hostile, ids, layout, agent, self.namespace, self.rng)
            self.post("hostile:" + hostile, dict(body, stream=self.rng.random() < 0.5))


def new_namespace(app_secret: str) -> str:
    """A fresh secret workflow id, inside the application ``app_secret`` when there is one."""
    workflow = secrets.token_urlsafe(16)
    return f"kvcomm:{app_secret}.{workflow}" if app_secret else f"kvcomm:{workflow}"


def streamed(ids, new_tokens: int, hints=None, namespace=None) -> dict:
    return dict(request(ids, new_tokens, hints, namespace), stream=True)


def hostile_request(kind: str, ids: list[int], layout: list, agent: str, namespace: str,
                    rng: random.Random) -> dict:
    """A request the server must refuse with a 4xx (or, for ``unknown_message``, serve densely);
    built from a valid agent call (``ids``, ``layout``) of the workflow's ``namespace``."""
    hints = protocol.encode(agent=agent, layout=layout)
    if kind == "malformed":
        return request(ids, 2, {"kvcomm": rng.choice(MALFORMED)}, namespace)
    if kind == "deep_nesting":
        return request(ids, 2, {"kvcomm": "[" * 20000 + "]" * 20000}, namespace)
    if kind == "oov_token":
        return request(ids[:-1] + [OUT_OF_VOCAB], 2, rng.choice((None, hints)), namespace)
    if kind == "negative_token":
        return request([-1] + ids[1:], 2, rng.choice((None, hints)), namespace)
    if kind == "bad_namespace":
        bad = rng.choice(("kvcomm:" + "A" * 1_000_000, "kvcomm:short", "plain:" + namespace[7:],
                          "kvcomm:" + namespace[7:] + "!"))
        return request(ids, 2, hints, bad)
    if kind == "layout_mismatch":
        wrong = [protocol.Piece(p.kind, p.length + (i == 0), p.placeholder, p.message)
                 for i, p in enumerate(layout)]
        return request(ids, 2, protocol.encode(agent=agent, layout=wrong), namespace)
    if kind == "unknown_message":
        ghosts = [protocol.Piece(p.kind, p.length, p.placeholder,
                                 p.message and f"ghost{rng.randrange(10**9)}") for p in layout]
        return request(ids, 2, protocol.encode(agent=agent, layout=ghosts), namespace)
    raise ValueError(f"unknown hostile request kind {kind!r}; known: {sorted(HOSTILE)}")
