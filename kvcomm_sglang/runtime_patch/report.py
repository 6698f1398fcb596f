"""What a response says about KVCOMM, and the Prometheus counters.

SGLang 0.5.17 forwards ``req.customized_info[key]`` to the response's ``meta_info[key]`` as one
entry per output token; KVCOMM reports once, on the first output token:
``meta_info["kvcomm"][0] = {"mode": "reuse"|"dense", "reused_tokens": n, "fallback_reason": r}``,
plus, on reuse, the reuse path's time: ``plan_ms`` (prompt checks and planning),
``materialize_ms`` (plan flattening, validation and the kernel; ``flatten_ms`` of it is the
flattening), their sum ``reuse_path_ms``, and ``forward_ms`` (from the end of the load-back to
the first token sampled: the model's pass over the recomputed tail, host wall time).
"""

from __future__ import annotations

REPORT_KEY = "kvcomm"
MAX_AGENT_LABELS = 64         # distinct agent label values; later agents count as "other"


class FirstTokenReport(list):
    """A per-token column whose first entry is the report and every other entry is None."""

    def __init__(self, report: dict):
        super().__init__([report])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(max(index.stop or 1, 1))
            return [self[0] if i == 0 else None for i in range(start, stop, step)]
        return super().__getitem__(0) if index == 0 else None


def set_report(req, mode: str, reused_tokens: int, reason: str | None) -> None:
    info = getattr(req, "customized_info", None)
    if info is None:
        info = {}
        req.customized_info = info
    info[REPORT_KEY] = FirstTokenReport({"mode": mode, "reused_tokens": int(reused_tokens),
                                         "fallback_reason": reason})


def update_report(req, **fields) -> None:
    """Add fields to the request's report (e.g. the reuse path's timings after load-back)."""
    column = (getattr(req, "customized_info", None) or {}).get(REPORT_KEY)
    if column:
        column[0].update(fields)


class Metrics:
    """Prometheus counters (created only when SGLang metrics are enabled). Label sets are
    bounded: agent ids past the first ``MAX_AGENT_LABELS`` share the label "other", fallback
    reasons keep only their kind (the part before ":")."""

    def __init__(self, labels: dict, registry=None):
        import functools

        import prometheus_client

        from kvcomm_sglang.runtime_patch.invariants import CHECKS

        kwargs = {} if registry is None else {"registry": registry}
        Counter = functools.partial(prometheus_client.Counter, **kwargs)  # noqa: N806
        Gauge = functools.partial(prometheus_client.Gauge, **kwargs)      # noqa: N806

        names = list(labels)
        self.labels = labels
        self.agents: set[str] = set()
        self.calls = Counter("kvcomm_agent_calls_total", "KVCOMM consumer calls by mode",
                             names + ["agent", "mode"])
        self.tokens = Counter("kvcomm_reused_tokens_total", "Prompt tokens served by reuse", names)
        self.prompt_tokens = Counter("kvcomm_prompt_tokens_total",
                                     "Prompt tokens of KVCOMM consumer calls", names)
        self.fallbacks = Counter("kvcomm_fallbacks_total", "Dense fallbacks by reason",
                                 names + ["reason"])
        self.store_bytes = Gauge("kvcomm_store_bytes", "Bytes held by the segment store", names)
        self.budget_bytes = Gauge("kvcomm_store_budget_bytes", "The segment store's byte budget",
                                  names)
        self.anchors = Gauge("kvcomm_anchors", "Anchors held", names)
        self.checks = Counter("kvcomm_invariant_checks_total",
                              "Invariant checks run (debug_invariants)", names)
        self.violations = Counter("kvcomm_invariant_violations_total",
                                  "Invariant violations found, by check", names + ["check"])
        self.leaked = Gauge("kvcomm_leaked_slots", "Store slots no namespace reaches (last "
                            "check)", names)
        self.lost = Gauge("kvcomm_lost_anchors", "Anchors whose blocks were freed (last check)",
                          names)
        for check in CHECKS:                          # every series exists from the start
            self.violations.labels(**labels, check=check)
        for gauge in (self.store_bytes, self.anchors, self.leaked, self.lost):
            gauge.labels(**labels).set(0)

    def agent_label(self, agent: str) -> str:
        if agent not in self.agents and len(self.agents) >= MAX_AGENT_LABELS:
            return "other"
        self.agents.add(agent)
        return agent

    def call(self, agent: str, mode: str, prompt_tokens: int, reused: int) -> None:
        self.calls.labels(**self.labels, agent=self.agent_label(agent), mode=mode).inc()
        self.prompt_tokens.labels(**self.labels).inc(prompt_tokens)
        self.tokens.labels(**self.labels).inc(reused)

    def fallback(self, reason: str) -> None:
        self.fallbacks.labels(**self.labels, reason=reason.split(":")[0]).inc()

    def sizes(self, store_bytes: int, anchors: int) -> None:
        self.store_bytes.labels(**self.labels).set(store_bytes)
        self.anchors.labels(**self.labels).set(anchors)

    def budget(self, budget_bytes: int) -> None:
        self.budget_bytes.labels(**self.labels).set(budget_bytes)

    def invariants(self, violated: list[str], leaked_slots: int, lost_anchors: int) -> None:
        self.checks.labels(**self.labels).inc()
        for check in violated:
            self.violations.labels(**self.labels, check=check).inc()
        self.leaked.labels(**self.labels).set(leaked_slots)
        self.lost.labels(**self.labels).set(lost_anchors)
