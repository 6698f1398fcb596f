"""KVCommRuntime: the KVCOMM state of one scheduler process, behind the radix cache.

Per workflow namespace (the request's ``extra_key``) a core ``KVCommState`` holds the messages'
base KV; per application (``applications.py``, shared by its workflows) an ``ApplicationState``
holds the agents' templates, found by their tokens, and the anchors; all stored in the server's
KV pool through the segment store. The runtime decides per request (reuse or dense, with a
reason), builds the materialize plan for the reused tail, and captures templates, messages and
anchors when a request finishes. Decisions depend only on token ids, message ids and the namespace's and its
application's state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function

from kvcomm_sglang import protocol
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.kernels import materialize
from kvcomm_sglang.application import template_key
from kvcomm_sglang.kernels.plan import from_reuse_plan
from kvcomm_sglang.metrics import ReuseStats
from kvcomm_sglang.planner import Fallback, MatchCache, PiecePlan, ReusePlan, reference_match
from kvcomm_sglang.rope import RopeSpec
from kvcomm_sglang.runtime_patch.applications import ApplicationTable
from kvcomm_sglang.runtime_patch.capture import capture
from kvcomm_sglang.runtime_patch.namespaces import Namespace, NamespaceTable
from kvcomm_sglang.runtime_patch.ownership import Ownership
from kvcomm_sglang.runtime_patch.segment_store import PoolKV, SegmentStore, StoreFull

logger = logging.getLogger(__name__)


@dataclass
class Decision:
    kind: str                        # "reuse" | "dense" | "produce" (base/template: no consumer)
    reason: str | None = None        # why not reuse
    plan: ReusePlan | None = None    # reuse: until materialized (it pins the blocks it reads)
    keys: dict = field(default_factory=dict)      # placeholder -> content key (pinned)
    learn: list = field(default_factory=list)
    version: tuple = ()              # the namespace's and its application's versions
    ns: object = None                # the Namespace decided in (None: namespace_limit)
    template: str | None = None      # the consuming template's key (it is pinned)
    reused: int = 0                  # tokens materialized at load-back
    recompute: int = 1               # prompt tokens the model computes at the end (reuse)
    plan_ms: float = 0.0             # the reuse path's time: prompt checks and the plan
    materialize_ms: float = 0.0      # plan flattening, checks and the kernel
    flatten_ms: float = 0.0          # of which plan flattening (host work, no GPU wait)
    loaded_at: float = 0.0           # perf_counter when its load-back ended (reuse)
    forward_ms: float | None = None  # load-back end to first token sampled (the model's pass)

    def pinned_blocks(self) -> set[int]:
        """Ids of the store blocks the plan reads (they must outlive eviction until then)."""
        if self.plan is None:
            return set()
        ids = set()
        for piece in self.plan.pieces:
            ids.add(id(piece.source))
            for anchor in piece.anchors:
                deviation = anchor.deviations.get(self.plan.consumer)
                if deviation is not None:
                    ids.update((id(deviation.content), id(deviation.template)))
        return ids


class KVCommRuntime(Ownership):
    """Decisions live as long as their request: ``on_finish`` ends them at a final finish,
    ``retain`` (the scheduler hook, after every batch) drops those of requests the scheduler no
    longer holds (aborted while queued, retracted). Any exception or out-of-memory while
    planning becomes a dense decision with the reason ``plan_error:<type>``."""

    def __init__(self, config: KVCommConfig, rope: RopeSpec, pool, allocator, pool_tokens: int,
                 req_to_token, make_room=None, backend: str = "auto", metrics=None,
                 derive_anchor_budget: bool = True, persistence=None):
        self.pool, self.backend, self.req_to_token = pool, backend, req_to_token
        budget = int(config.store_budget_fraction * pool_tokens)
        self.store = SegmentStore(pool, allocator, budget, make_room,
                                  make_budget=self._make_store_room,
                                  quota_tokens=int(config.namespace_quota_fraction * budget))
        if derive_anchor_budget:        # anchors of a namespace: a share of its quota, in bytes
            anchors = int(config.store_anchor_fraction * self.store.quota_tokens
                          * self.store.bytes_per_token)
            config = dataclasses.replace(config, anchor_budget_bytes=max(anchors, 1))
        self.config, self.rope = config, rope
        k0 = pool.k_buffer[0]
        self.num_layers, self.num_heads, self.head_dim = len(pool.k_buffer), k0.shape[1], k0.shape[2]
        self.cos_sin = rope.cos_sin_table(4096, device=k0.device)
        # anchor matching read in place from the pool (Triton) where the kernels run compiled
        self.matcher = pool_matcher(pool) if k0.is_cuda and backend in ("auto", "triton") \
            else cpu_matcher() if not k0.is_cuda and backend in ("auto", "cpu") else None
        self.profile = k0.is_cuda and os.environ.get("KVCOMM_PROFILE") == "1"
        self.match_cache = MatchCache(config.match_cache_bytes)     # one budget, all namespaces
        self.persistence = persistence      # saves and restores applications (--kvcomm-anchor-path)
        self.applications = ApplicationTable(self)
        self.namespaces = NamespaceTable(self)
        self.decisions: dict[str, Decision] = {}
        self.stats = ReuseStats()
        self.metrics = metrics
        if metrics is not None:
            metrics.budget(self.store.max_tokens * self.store.bytes_per_token)

    # ---- decisions (side-effect free apart from caching) ----
    def hints_of(self, req) -> protocol.Hints | None:
        """The request's decoded hints, parsed once per request (the scheduler matches a
        request's prefix several times; each decode is a JSON parse and a validation)."""
        custom = getattr(req.sampling_params, "custom_params", None)
        cached = getattr(req, "_kvcomm_hints", None)
        if cached is not None and cached[0] is custom:
            return cached[1]
        try:
            hints = protocol.decode(custom)
        except (ValueError, RecursionError):     # refused at the HTTP edge; never trust it here
            hints = None
        req._kvcomm_hints = (custom, hints)
        return hints

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            raise ValueError(f"namespace limit: {len(self.namespaces)} active namespaces")
        return ns

    def decide(self, req) -> Decision | None:
        hints = self.hints_of(req)
        extra = getattr(req, "extra_key", None)
        if hints is None or not (isinstance(extra, str) and extra.startswith(self.config.namespace_prefix)):
            return None
        cached = self.decisions.get(req.rid)
        if cached is not None and cached.ns is not None and cached.ns is self.namespaces.get(
                extra, create=False) and cached.version == _version(cached.ns):
            return cached
        start = self._clock()
        with _annotate("kvcomm.plan"):
            ns, decision = self._decide_safely(req, hints, extra)
        decision.plan_ms = (self._clock() - start) * 1e3
        decision.ns = ns
        decision.version = _version(ns) if ns is not None else ()
        self.decisions[req.rid] = decision
        return decision

    def _decide_safely(self, req, hints, extra: str) -> tuple[Namespace | None, Decision]:
        """Finding the namespace (which may make room) and planning: any exception, an
        out-of-memory included, computes densely with a counted reason."""
        ns = None
        try:
            ns = self.namespaces.get(extra)
            if ns is None:
                return None, Decision("dense", "namespace_limit")
            return ns, self._decide(req, hints, ns)
        except Exception as exc:          # torch.OutOfMemoryError included: compute densely
            logger.exception("kvcomm: planning failed for %s", req.rid)
            return ns, Decision("dense", f"plan_error:{type(exc).__name__}")

    def _decide(self, req, hints, ns: Namespace) -> Decision:
        if not hints.consumes:
            return Decision("produce")
        if getattr(req, "return_logprob", False):
            return Decision("dense", "logprob_requested")
        ids = req.origin_input_ids
        template = template_key(*protocol.template_of(hints.layout, ids))
        if template not in ns.app.state.templates:
            return Decision("dense", "unknown_template", template=template)
        keys = {}
        for piece, start, end in protocol.piece_spans(hints.layout):
            if piece.kind == "content":
                key = ns.messages.get(piece.message)
                content = ns.state.contents.get(key) if key else None
                if content is None:
                    return Decision("dense", "unknown_message", template=template)
                if tuple(ids[start:end]) != content.token_ids:
                    return Decision("dense", "message_mismatch", template=template)
                keys[piece.placeholder] = key
        plan = ns.state.plan(template, keys)
        if isinstance(plan, Fallback):
            return Decision("dense", plan.reason, keys=keys, learn=plan.learn, template=template)
        recompute = self.config.recompute_count(hints.layout[-1].length)
        return Decision("reuse", plan=plan, keys=keys, recompute=min(recompute, len(ids)),
                        template=template)

    # ---- materialize the reused tail [d, N - recompute) into dst slots ----
    def _clock(self) -> float:
        """Wall time; with ``KVCOMM_PROFILE=1`` after waiting for the GPU (exact but syncing)."""
        if self.profile:
            torch.cuda.synchronize()
        return time.perf_counter()

    def materialize(self, req, decision: Decision, d: int, dst: torch.Tensor) -> None:
        start = self._clock()
        with _annotate("kvcomm.materialize"):
            self._materialize(req, decision, d, dst)
        decision.materialize_ms = (self._clock() - start) * 1e3
        decision.plan = None             # written: its blocks are no longer pinned

    def _materialize(self, req, decision: Decision, d: int, dst: torch.Tensor) -> None:
        plan = decision.plan
        layout, n = plan.layout, plan.layout.total_length
        if not self.config.derotated_storage:   # the official absolute frame (faithful A/B
            self._assemble_absolute(decision, d, n - decision.recompute, dst)   # runs): torch
            return
        pieces = list(plan.pieces)
        if d < layout.prefix_length:       # x0 not cached yet: its template KV is exact
            x0 = decision.ns.state.templates[plan.consumer].pieces[0]
            pieces.insert(0, PiecePlan("template", None, x0, 0))
        start = time.perf_counter()
        with _annotate("kvcomm.flatten"):
            work = from_reuse_plan(types.SimpleNamespace(consumer=plan.consumer, pieces=pieces),
                                   dst, _slots_of, self.num_layers, self.num_heads,
                                   self.head_dim, self.rope.is_neox,
                                   self.config.first_corrected_layer,
                                   rows=(d, n - decision.recompute))
        decision.flatten_ms = (time.perf_counter() - start) * 1e3
        self._ensure_table(n)
        with _annotate("kvcomm.kernel"):
            materialize(work, self.pool, self.cos_sin, backend=self.backend)

    def _assemble_absolute(self, decision: Decision, lo: int, hi: int, dst: torch.Tensor) -> None:
        """Faithful mode: the kernels read the position-0 frame only, so the core's torch
        assembly (``KVCommState.assemble``, the official math) writes rows [lo, hi)."""
        plan = decision.plan
        k, v = decision.ns.state.assemble(plan.consumer, decision.keys, plan)
        for layer, (kbuf, vbuf) in enumerate(zip(self.pool.k_buffer, self.pool.v_buffer)):
            kbuf[dst] = k[layer, lo:hi].to(kbuf.dtype)
            vbuf[dst] = v[layer, lo:hi].to(vbuf.dtype)

    def _ensure_table(self, n: int) -> None:
        if n > self.cos_sin.shape[0]:
            size = max(n, 2 * self.cos_sin.shape[0])
            self.cos_sin = self.rope.cos_sin_table(size, device=self.cos_sin.device)

    # ---- the end of a request ----
    def on_finish(self, req, kv_len: int) -> None:
        """SGLang releases the request's KV: capture at a final finish, nothing otherwise (an
        aborted request, or a retracted one, which is planned again when re-admitted)."""
        decision = self.decisions.get(req.rid)
        if decision is None:
            return
        try:
            if not _finished(req):
                self.count_fallback("retracted")
            elif _aborted(req):
                self.count_fallback("aborted")
            else:
                self._finish(req, decision, kv_len)
        finally:        # the decision pinned its messages and blocks until now
            self.decisions.pop(req.rid, None)
            if decision.ns is not None:
                self.sweep_workflow(decision.ns)

    def _finish(self, req, decision: Decision, kv_len: int) -> None:
        if decision.kind in ("reuse", "dense"):
            self.record_call(req, decision, decision.reused)
        ns = decision.ns
        if ns is None or ns.name not in self.namespaces:
            return
        try:
            with _annotate("kvcomm.capture"), self.store.building(ns.owner), \
                    self.store.building(ns.app.owner):
                capture(self, ns, self.hints_of(req), decision, req, kv_len)
        except StoreFull as exc:
            self.count_fallback("store_full")
            logger.info("kvcomm: capture skipped for %s: %s", req.rid, exc)

    def retain(self, live_rids) -> int:
        """Drop the decisions of requests the scheduler no longer holds; -> how many."""
        gone = [rid for rid in self.decisions if rid not in live_rids]
        for rid in gone:
            decision = self.decisions.pop(rid)
            if decision.ns is not None:
                self.sweep_workflow(decision.ns)
        return len(gone)

    def forget(self, rid: str) -> None:
        decision = self.decisions.pop(rid, None)
        if decision is not None and decision.ns is not None:
            self.sweep_workflow(decision.ns)

    def gather(self, req, start: int, end: int):
        slots = self.req_to_token[req.req_pool_idx, start:end].to(torch.int64)
        return (self.store.gather(self.pool.k_buffer, slots).float(),
                self.store.gather(self.pool.v_buffer, slots).float())

    # ---- accounting ----
    def record_call(self, req, decision: Decision, reused: int) -> None:
        """Account one consumer call (reuse from init_load_back, dense at finish)."""
        hints = self.hints_of(req)
        agent, n = hints.agent if hints else "?", len(req.origin_input_ids)
        reason = None if decision.kind == "reuse" else (decision.reason or "dense")
        self.stats.record_call(agent, n, reused if reason is None else 0, reason)
        if self.metrics is not None:
            self.metrics.call(agent, decision.kind, n, reused if reason is None else 0)
            if reason:
                self.metrics.fallback(reason)
            anchors = sum(app.state.anchors.num_anchors for app in self.applications.values())
            self.metrics.sizes(self.store.tokens * self.store.bytes_per_token, anchors)

    def mark_dense(self, req, reason: str) -> None:
        """The request computes densely after all (load-back failed, or SGLang's own cache held
        the whole prompt): say so and learn nothing from it."""
        decision = self.decisions.get(req.rid)
        if decision is not None:
            decision.kind, decision.reason, decision.reused = "dense", reason, 0
            decision.plan, decision.learn = None, []

    def count_fallback(self, reason: str) -> None:
        self.stats.fallbacks[reason] += 1
        if self.metrics is not None:
            self.metrics.fallback(reason)


def _version(ns: Namespace) -> tuple[int, int]:
    """What a cached decision was made with: its namespace's and its application's versions."""
    return ns.version, ns.app.version


def _annotate(name: str):
    """A profiler range (``benchmarks/gpu/trace_summary.py`` lists them) while a profiler runs;
    nothing otherwise (record_function costs ~10 us per range even when no one records)."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def cpu_matcher():
    """``KVCommState``'s matcher on the CPU: ``kernels.cpu_distances`` (each anchor read once,
    one difference per alignment, no (A, L, T, H, D) stack)."""
    from kvcomm_sglang.kernels.cpu_distances import cpu_anchor_distances
    return cpu_anchor_distances


def pool_matcher(pool):
    """``KVCommState``'s matcher for pool-resident blocks: ``kernels.distances.anchor_distances``
    reads the content and its anchors in place (one launch), no (A, L, T, H, D) gather."""
    from kvcomm_sglang.kernels.distances import anchor_distances

    def match(kv, embs):
        if not isinstance(kv, PoolKV) or not all(isinstance(e, PoolKV) for e in embs):
            return reference_match(kv, embs)
        t = kv.length
        head = torch.stack([e.slots[:t] for e in embs])
        tail = torch.stack([e.slots[e.length - t:] for e in embs])
        d = anchor_distances(pool, kv.slots, head, tail)
        return d.ph_k, d.ph_v, d.pf_k, d.pf_v, d.gate_v

    return match


def _slots_of(source) -> np.ndarray:
    if isinstance(source, tuple):
        anchor, consumer, kind = source
        deviation = anchor.deviations[consumer]
        source = deviation.content if kind == "content" else deviation.template
    if not isinstance(source, PoolKV):
        raise TypeError(f"stored block {type(source).__name__} does not live in the pool")
    return source.slots_np


def _finished(req) -> bool:
    """A final finish (SGLang also releases a retracted request's KV, unfinished)."""
    finished = getattr(req, "finished", None)
    return finished() if callable(finished) else getattr(req, "finished_reason", None) is not None


def _aborted(req) -> bool:
    reason = getattr(req, "finished_reason", None)
    return reason is not None and type(reason).__name__ == "FINISH_ABORT"
