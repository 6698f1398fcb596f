"""KVCommRuntime: the KVCOMM state of one scheduler process, behind the radix cache.

Per workflow namespace (the request's ``extra_key``) a core ``KVCommState`` holds the agents'
templates, the messages' base KV and the anchors, all stored in the server's KV pool through
the segment store. The runtime decides per request (reuse or dense, with a reason), builds the
materialize plan for the reused tail, and captures templates, messages and anchors when a
request finishes. Decisions depend only on token ids, message ids and the namespace's state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import types
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function

from kvcomm_sglang import protocol
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.kernels import materialize
from kvcomm_sglang.kernels.plan import from_reuse_plan
from kvcomm_sglang.metrics import ReuseStats
from kvcomm_sglang.planner import (Fallback, KVCommState, MatchCache, PiecePlan, ReusePlan,
                                   reference_match)
from kvcomm_sglang.rope import RopeSpec
from kvcomm_sglang.runtime_patch.segment_store import PoolKV, SegmentStore, StoreFull

logger = logging.getLogger(__name__)
MAX_NAMESPACES = 1024


@dataclass
class Decision:
    kind: str                        # "reuse" | "dense" | "produce" (base/template: no consumer)
    reason: str | None = None        # why not reuse
    plan: ReusePlan | None = None
    keys: dict = field(default_factory=dict)      # placeholder -> content key
    learn: list = field(default_factory=list)
    version: int = -1
    reused: int = 0                  # tokens materialized at load-back
    recompute: int = 1               # prompt tokens the model computes at the end (reuse)
    plan_ms: float = 0.0             # the reuse path's time: prompt checks and the plan
    materialize_ms: float = 0.0      # plan flattening, checks and the kernel
    flatten_ms: float = 0.0          # of which plan flattening (host work, no GPU wait)


class Namespace:
    def __init__(self, name: str, runtime: "KVCommRuntime"):
        self.name, self.runtime = name, runtime
        self.state = KVCommState(runtime.config, runtime.rope, name, make_kv=runtime.store.make,
                                 on_evict=self._anchor_evicted, matcher=runtime.matcher,
                                 cache=runtime.match_cache)
        self.messages: OrderedDict[str, str] = OrderedDict()     # message id -> content key
        self.version = 0

    def bind(self, message: str, key: str) -> None:
        old = self.messages.pop(message, None)
        self.messages[message] = key
        if old is not None and old != key and old not in self.messages.values():
            self.drop_content(old)
        self.version += 1

    def drop_content(self, key: str) -> None:
        content = self.state.drop_content(key)
        if content is not None and not self._is_embedding(content.kv):
            self.runtime.store.free(content.kv)
        self.version += 1

    def _anchor_evicted(self, anchor) -> None:
        for deviation in anchor.deviations.values():
            self.runtime.store.free(deviation.content)
            self.runtime.store.free(deviation.template)
        live = {id(c.kv) for c in self.state.contents.values()}
        if id(anchor.emb) not in live and not self._is_embedding(anchor.emb, skip=anchor):
            self.runtime.store.free(anchor.emb)
        self.version += 1

    def _is_embedding(self, block, skip=None) -> bool:
        return any(a.emb is block for pool in self.state.anchors.pools.values()
                   for a in pool.anchors.values() if a is not skip)

    def blocks(self):
        for template in self.state.templates.values():
            yield from template.pieces
        for content in self.state.contents.values():
            yield content.kv


class KVCommRuntime:
    def __init__(self, config: KVCommConfig, rope: RopeSpec, pool, allocator, pool_tokens: int,
                 req_to_token, make_room=None, backend: str = "auto", metrics=None,
                 derive_anchor_budget: bool = True):
        self.pool, self.backend, self.req_to_token = pool, backend, req_to_token
        self.store = SegmentStore(pool, allocator, int(config.store_budget_fraction * pool_tokens),
                                  make_room, make_budget=self._evict_for_budget)
        if derive_anchor_budget:        # anchors of a namespace: a share of the store, in bytes
            budget = int(config.store_anchor_fraction * self.store.max_tokens
                         * self.store.bytes_per_token)
            config = dataclasses.replace(config, anchor_budget_bytes=max(budget, 1))
        self.config, self.rope = config, rope
        k0 = pool.k_buffer[0]
        self.num_layers, self.num_heads, self.head_dim = len(pool.k_buffer), k0.shape[1], k0.shape[2]
        self.cos_sin = rope.cos_sin_table(4096, device=k0.device)
        # anchor matching read in place from the pool (Triton) where the kernels run compiled
        self.matcher = pool_matcher(pool) if k0.is_cuda and backend in ("auto", "triton") else None
        self.profile = k0.is_cuda and os.environ.get("KVCOMM_PROFILE") == "1"
        self.match_cache = MatchCache(config.match_cache_bytes)     # one budget, all namespaces
        self.namespaces: OrderedDict[str, Namespace] = OrderedDict()
        self.decisions: dict[str, Decision] = {}
        self.stats = ReuseStats()
        self.metrics = metrics

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
        except ValueError:      # refused at the HTTP edge; never trust it here
            hints = None
        req._kvcomm_hints = (custom, hints)
        return hints

    def namespace(self, name: str) -> Namespace:
        if name not in self.namespaces:
            while len(self.namespaces) >= MAX_NAMESPACES:
                self.drop_namespace(next(iter(self.namespaces)))
            self.namespaces[name] = Namespace(name, self)
        self.namespaces.move_to_end(name)
        return self.namespaces[name]

    def decide(self, req) -> Decision | None:
        hints = self.hints_of(req)
        extra = getattr(req, "extra_key", None)
        if hints is None or not (isinstance(extra, str) and extra.startswith(self.config.namespace_prefix)):
            return None
        ns = self.namespace(extra)
        cached = self.decisions.get(req.rid)
        if cached is not None and cached.version == ns.version:
            return cached
        start = self._clock()
        with _annotate("kvcomm.plan"):
            decision = self._decide(req, hints, ns)
        decision.plan_ms = (self._clock() - start) * 1e3
        decision.version = ns.version
        self.decisions[req.rid] = decision
        return decision

    def _decide(self, req, hints, ns: Namespace) -> Decision:
        if not hints.consumes:
            return Decision("produce")
        if getattr(req, "return_logprob", False):
            return Decision("dense", "logprob_requested")
        template = ns.state.templates.get(hints.agent)
        if template is None:
            return Decision("dense", "unknown_template")
        keys, ids, pos = {}, req.origin_input_ids, 0
        names = [p.placeholder for p in hints.layout if p.kind == "content"]
        if names != template.placeholders:
            return Decision("dense", "layout_mismatch")
        for i, piece in enumerate(hints.layout):
            span = tuple(ids[pos:pos + piece.length])
            if piece.kind == "template":
                if span != template.piece_ids[i // 2]:
                    return Decision("dense", "template_mismatch")
            else:
                key = ns.messages.get(piece.message)
                content = ns.state.contents.get(key) if key else None
                if content is None:
                    return Decision("dense", "unknown_message")
                if span != content.token_ids:
                    return Decision("dense", "message_mismatch")
                keys[piece.placeholder] = key
            pos += piece.length
        plan = ns.state.plan(hints.agent, keys)
        if isinstance(plan, Fallback):
            return Decision("dense", plan.reason, keys=keys, learn=plan.learn)
        recompute = self.config.recompute_last
        if self.config.recompute_last_piece:
            recompute = max(recompute, hints.layout[-1].length)
        return Decision("reuse", plan=plan, keys=keys, recompute=min(recompute, len(ids)))

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

    def _materialize(self, req, decision: Decision, d: int, dst: torch.Tensor) -> None:
        plan = decision.plan
        layout, n = plan.layout, plan.layout.total_length
        pieces = list(plan.pieces)
        if d < layout.prefix_length:       # x0 not cached yet: its template KV is exact
            ns = self.namespaces[req.extra_key]
            x0 = ns.state.templates[plan.consumer].pieces[0]
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

    def _ensure_table(self, n: int) -> None:
        if n > self.cos_sin.shape[0]:
            size = max(n, 2 * self.cos_sin.shape[0])
            self.cos_sin = self.rope.cos_sin_table(size, device=self.cos_sin.device)

    # ---- learning when a request finishes ----
    def on_finish(self, req, kv_len: int) -> None:
        try:
            with _annotate("kvcomm.capture"):
                self._on_finish(req, kv_len)
        finally:        # the decision protected its messages from store eviction until now
            self.decisions.pop(req.rid, None)

    def _on_finish(self, req, kv_len: int) -> None:
        decision = self.decisions.get(req.rid)
        hints = self.hints_of(req)
        if hints is None or decision is None or _aborted(req):
            return
        ns = self.namespace(req.extra_key)
        ids, n = list(req.origin_input_ids), len(req.origin_input_ids)
        if decision.kind in ("reuse", "dense"):
            self.record_call(req, decision, decision.reused)
        try:
            if hints.template or hints.base or decision.learn:
                k, v = self._gather(req, 0, n)
                if hints.template:
                    self._register_template(ns, hints, ids, k, v)
                if hints.base:
                    message, placeholder, drop = hints.base
                    content = ns.state.register_content(placeholder, ids[drop:], k[:, drop:],
                                                        v[:, drop:], torch.arange(drop, n))
                    ns.bind(message, content.key)
                if decision.learn and all(key in ns.state.contents for key in decision.keys.values()):
                    ns.state.record(hints.agent, decision.keys, decision.learn, k, v)
                    ns.version += 1
            if hints.capture:
                self._capture_output(ns, hints, req, n, kv_len)
        except StoreFull as exc:
            self.count_fallback("store_full")
            logger.info("kvcomm: capture skipped for %s: %s", req.rid, exc)

    def _register_template(self, ns, hints, ids, k, v) -> None:
        spans, piece_ids, names, pos = [], [], [], 0
        for piece in hints.layout:
            if piece.kind == "template":
                spans.append((pos, pos + piece.length))
                piece_ids.append(ids[pos:pos + piece.length])
            else:
                names.append(piece.placeholder)
            pos += piece.length
        old = ns.state.templates.get(hints.agent)
        ns.state.register_template(hints.agent, piece_ids, names, k, v, spans)
        if old is not None:
            for block in old.pieces:
                self.store.free(block)
        ns.version += 1

    def _capture_output(self, ns, hints, req, n: int, kv_len: int) -> None:
        out = list(req.output_ids)
        if len(out) < 2 or kv_len < n + len(out) - 1:
            self.count_fallback("capture_too_short")
            return
        k, v = self._gather(req, n, n + len(out) - 1)
        message, placeholder = hints.capture
        content = ns.state.register_response(placeholder, out, k, v, n)
        ns.bind(message, content.key)

    def _gather(self, req, start: int, end: int):
        slots = self.req_to_token[req.req_pool_idx, start:end].to(torch.int64)
        return (self.store.gather(self.pool.k_buffer, slots).float(),
                self.store.gather(self.pool.v_buffer, slots).float())

    # ---- memory ----
    def evict_store(self, num_tokens: int, keep_namespaces: bool = False) -> int:
        """Free at least ``num_tokens`` store slots: oldest namespaces' messages first (least
        recently bound first, never one a queued request was planned with), then their
        anchors, then whole namespaces (unless ``keep_namespaces``)."""
        start = self.store.tokens
        in_use = {key for d in self.decisions.values() for key in d.keys.values()}
        for name in list(self.namespaces):
            ns = self.namespaces[name]
            for message in list(ns.messages):
                if start - self.store.tokens >= num_tokens:
                    return start - self.store.tokens
                if ns.messages[message] not in in_use:
                    ns.drop_content(ns.messages.pop(message))
            while ns.state.anchors.num_anchors and start - self.store.tokens < num_tokens:
                pool = max(ns.state.anchors.pools.values(), key=len)
                pool.evict_one()
            if start - self.store.tokens < num_tokens and not keep_namespaces:
                self.drop_namespace(name)
        return start - self.store.tokens

    def _evict_for_budget(self, num_tokens: int) -> int:
        """The store is over its budget: make room inside it (namespaces stay)."""
        return self.evict_store(num_tokens, keep_namespaces=True)

    def drop_namespace(self, name: str) -> None:
        ns = self.namespaces.pop(name)
        ns.state.release_caches()
        for pool in ns.state.anchors.pools.values():
            while len(pool):
                pool.evict_one()
        for block in list(ns.blocks()):
            self.store.free(block)

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
            anchors = sum(ns.state.anchors.num_anchors for ns in self.namespaces.values())
            self.metrics.sizes(self.store.tokens * self.store.bytes_per_token, anchors)

    def mark_dense(self, req, reason: str) -> None:
        """Load-back failed: the request computes densely; say so and learn nothing from it."""
        decision = self.decisions.get(req.rid)
        if decision is not None:
            decision.kind, decision.reason, decision.reused = "dense", reason, 0

    def count_fallback(self, reason: str) -> None:
        self.stats.fallbacks[reason] += 1
        if self.metrics is not None:
            self.metrics.fallback(reason)

    def forget(self, rid: str) -> None:
        self.decisions.pop(rid, None)


def _annotate(name: str):
    """A profiler range (``benchmarks/gpu/trace_summary.py`` lists them) while a profiler runs;
    nothing otherwise (record_function costs ~10 us per range even when no one records)."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


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


def _aborted(req) -> bool:
    reason = getattr(req, "finished_reason", None)
    return reason is not None and type(reason).__name__ == "FINISH_ABORT"
