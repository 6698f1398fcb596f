"""KVCommRadixCache: SGLang 0.5.17's RadixCache plus KVCOMM reuse through the host-hit seam.

``match_prefix`` reports a KVCOMM request's reusable tail (everything after the device-matched
prefix up to, not including, the last prompt token, or the last template piece with
``recompute_last_piece``) as a host hit, without side effects;
``init_load_back`` allocates slots, materializes the corrected KV into them and inserts a node
tagged ``kvcomm_approx`` under the request's own path; ``cache_finished_req`` captures templates,
messages and anchors before SGLang frees the request's slots. Requests without KVCOMM hints are
served exactly as by ``RadixCache``.

Exactness (DESIGN §4): only a request planned for reuse ("opted in") may read approximate KV.
* The mark belongs to the KV: every node holding approximate slots carries ``kvcomm_approx``.
  ``init_load_back`` is the only place that writes approximate KV and sets it; ``_split_node``,
  the only tree operation that moves slots into a new node, copies it; ``insert`` adds only the
  inserting request's own KV, which is beneath its approximate node when it has one.
* Reads: any other request's match is cut before the first marked node on its path
  (``_exact_only``), and that request is kept out of the tree.
* Writes: such a request never inserts into a path that holds a marked node (SGLang's insert
  would keep the approximate copy and, for a chunked prefill, rewrite the request's own row
  with it).
``kvcomm_sglang.runtime_patch.invariants`` checks both after every batch in debug mode.
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from kvcomm_sglang.runtime_patch import invariants
from kvcomm_sglang.runtime_patch.report import set_report, update_report

logger = logging.getLogger(__name__)


class KVCommRadixCache(RadixCache):
    def __init__(self, params, runtime_factory):
        self.runtime = self.checker = None
        super().__init__(params)
        self.runtime = runtime_factory(self)
        if self.runtime.config.debug_invariants:
            self.checker = invariants.InvariantChecker(self)

    # ---- matching ----
    def match_prefix(self, params):
        base = super().match_prefix(params)
        req = params.req
        if req is None or self.disable or self.runtime is None:
            return base
        decision = self.runtime.decide(req)
        if decision is None:
            return self._exact_only(base, req)
        if decision.kind != "reuse":
            set_report(req, "dense", 0, decision.reason)
            return self._exact_only(base, req)
        tail = len(req.origin_input_ids) - decision.recompute - len(base.device_indices)
        if tail <= 0:
            return self._served_from_tree(base, req, decision)
        set_report(req, "reuse", tail, None)
        node = base.last_device_node
        return base._replace(host_hit_length=tail, best_match_node=node, last_host_node=node)

    def _served_from_tree(self, base, req, decision):
        """The tree holds the whole reused span already. Approximate nodes on the path (an
        earlier reuse of the same prompt) are reuse of that many tokens; an all-exact path is
        SGLang's own radix hit, reported and counted as dense (``radix_hit``), not as reuse."""
        approx = sum(len(n.key) for n in self.path_to(base.last_device_node)
                     if getattr(n, "kvcomm_approx", False))
        if approx:
            decision.reused = approx
            set_report(req, "reuse", approx, None)
        else:
            self.runtime.mark_dense(req, "radix_hit")
            set_report(req, "dense", 0, "radix_hit")
        return base

    def _exact_only(self, base, req):
        """Cut the match before the first approximate node on its path. The request then
        computes those tokens itself; it is kept out of the tree (``skip_radix_cache_insert``)
        so that insertion never swaps its exact KV for the approximate copy mid-decode."""
        path = self.path_to(base.last_device_node)
        approx = [i for i, n in enumerate(path) if getattr(n, "kvcomm_approx", False)]
        if not approx:
            return base
        cut = path[approx[-1]]                      # the approximate node closest to the root
        keep = len(base.device_indices) - sum(len(n.key) for n in path[: approx[-1] + 1])
        parent = cut.parent
        req.skip_radix_cache_insert = True
        return base._replace(device_indices=base.device_indices[:keep], last_device_node=parent,
                             last_host_node=parent, best_match_node=parent)

    def path_to(self, node) -> list:
        """The nodes from ``node`` up to (not including) the root."""
        path = []
        while node is not None and node is not self.root_node:
            path.append(node)
            node = node.parent
        return path

    def _split_node(self, key, child, split_len: int):
        new_node = super()._split_node(key, child, split_len)
        if getattr(child, "kvcomm_approx", False):
            new_node.kvcomm_approx = True           # it holds the first slots of child's KV
        return new_node

    def is_opted_in(self, req) -> bool:
        """May ``req`` read and write approximate KV (it was planned for reuse)?"""
        if self.runtime is None or req is None:
            return False
        decision = self.runtime.decisions.get(req.rid)
        return decision is not None and decision.kind == "reuse"

    def touches_approx(self, req, tokens) -> bool:
        """Would inserting ``tokens`` for ``req`` walk into approximate KV it may not see?"""
        extra = getattr(req, "extra_key", None)
        if not (isinstance(extra, str) and self.runtime is not None
                and extra.startswith(self.runtime.config.namespace_prefix)):
            return False                            # approximate nodes live in KVCOMM namespaces
        if self.is_opted_in(req):
            return False
        node = super().match_prefix(MatchPrefixParams(key=RadixKey(tokens, extra))).last_device_node
        return any(getattr(n, "kvcomm_approx", False) for n in self.path_to(node))

    # ---- load-back: materialize the reused tail ----
    def init_load_back(self, params):
        req, node, n = params.req, params.best_match_node, params.host_hit_length
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        decision = self.runtime.decide(req) if req is not None else None
        if decision is None or decision.kind != "reuse" or n <= 0:
            return empty, node
        slots = self.token_to_kv_pool_allocator.alloc(n)
        if slots is None:
            super().evict(EvictParams(num_tokens=n))
            slots = self.token_to_kv_pool_allocator.alloc(n)
        if slots is None:
            return self._load_back_failed(req, "pool_full", empty, node)
        slots = slots.to(torch.int64)
        d = len(req.prefix_indices)
        try:
            if torch.cuda.is_available() and slots.is_cuda:
                torch.cuda.current_stream().synchronize()   # reclaimed slots may be in flight
            self.runtime.materialize(req, decision, d, slots)
        except Exception as exc:                             # fail closed: compute densely
            logger.exception("kvcomm: materialize failed for %s", req.rid)
            self.token_to_kv_pool_allocator.free(slots)
            return self._load_back_failed(req, f"materialize_error:{type(exc).__name__}", empty,
                                          node)
        new = TreeNode(priority=node.priority)
        new.parent = node
        new.key = RadixKey(req.origin_input_ids[d:d + n], req.extra_key)
        new.value = slots.clone()
        new.kvcomm_approx = True
        if self.checker is not None:
            self.checker.approx_written(slots)
        node.children[new.key.child_key(self.page_size)] = new
        self.evictable_size_ += n
        self._update_leaf_status(node)
        self._update_leaf_status(new)
        self._record_store_event(new)
        decision.reused, decision.loaded_at = n, time.perf_counter()
        update_report(req, plan_ms=round(decision.plan_ms, 3),
                      materialize_ms=round(decision.materialize_ms, 3),
                      flatten_ms=round(decision.flatten_ms, 3),
                      reuse_path_ms=round(decision.plan_ms + decision.materialize_ms, 3))
        return slots, new

    def _load_back_failed(self, req, reason, empty, node):
        self.runtime.mark_dense(req, reason)
        set_report(req, "dense", 0, reason)
        return empty, node

    # ---- lifecycle ----
    def _report_forward(self, req) -> None:
        """A reused request's prefill forward is done (SGLang caches it right after sampling
        its first token, before streaming it): report ``forward_ms`` since its load-back."""
        decision = self.runtime.decisions.get(req.rid) if self.runtime is not None else None
        if decision is not None and decision.loaded_at and decision.forward_ms is None:
            decision.forward_ms = (time.perf_counter() - decision.loaded_at) * 1e3
            update_report(req, forward_ms=round(decision.forward_ms, 3))

    def cache_unfinished_req(self, req, chunked=False):
        self._report_forward(req)
        if self.touches_approx(req, req.get_fill_ids()):
            req.skip_radix_cache_insert = True      # keeps its own exact KV, out of the tree
            return
        super().cache_unfinished_req(req, chunked)

    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int):
        self._report_forward(req)
        if is_insert and self.touches_approx(
                req, (req.origin_input_ids + req.output_ids)[:kv_len_to_handle]):
            is_insert = False
        if self.runtime is not None:
            try:
                self.runtime.on_finish(req, kv_len_to_handle)
            except Exception:                                # never break SGLang's bookkeeping
                logger.exception("kvcomm: capture failed for %s", req.rid)
                self.runtime.count_fallback("capture_error")
                self.runtime.forget(req.rid)
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)

    def after_batch(self, live_reqs) -> None:
        """The scheduler hook, once per loop iteration: decisions of requests the scheduler no
        longer holds end here; saved applications that new requests name are restored and
        changed ones saved (``--kvcomm-anchor-path``); in debug mode the invariants are checked."""
        if self.runtime is None:
            return
        self.runtime.retain({req.rid for req in live_reqs})
        if self.runtime.persistence is not None:
            try:
                self.runtime.persistence.after_batch(self.runtime, live_reqs)
            except Exception:                   # never skip the checks below for it
                logger.exception("kvcomm: saving or restoring anchors failed")
        if self.checker is not None and (live_reqs or not self.checker.idle_checked):
            self.checker.check(live_reqs)

    def evict(self, params):
        result = super().evict(params)
        short = params.num_tokens - result.num_tokens_evicted
        if short > 0 and self.runtime is not None:
            freed = self.runtime.evict_store(short)
            result = EvictResult(num_tokens_evicted=result.num_tokens_evicted + freed)
        return result

    def evictable_size(self):
        """Tree leaves plus the store slots eviction can free; what live requests pin is
        protected (``protected_size``): both sums together are the store's size."""
        if self.runtime is None:
            return super().evictable_size()
        return super().evictable_size() + self.runtime.store.tokens - self.runtime.pinned_tokens()

    def protected_size(self):
        pinned = self.runtime.pinned_tokens() if self.runtime is not None else 0
        return super().protected_size() + pinned

    def reset(self):
        super().reset()
        if getattr(self, "runtime", None) is not None:
            for name in list(self.runtime.namespaces):
                self.runtime.drop_namespace(name)

    def make_room(self, num_tokens: int) -> None:
        """The store's last resort before it gives up: evict tree leaves, their slots free at
        once. Captures run in ``cache_finished_req``, inside the free group SGLang opens while
        it processes a batch's results (frees are collected and released at its end); evicted
        leaves are idle (no request holds them), so their frees bypass the group, else the
        store's next allocation could not see them (found on the GPU: "KV pool has no 511 free
        slots" with a full, evictable tree)."""
        allocator = self.token_to_kv_pool_allocator
        grouped = getattr(allocator, "is_not_in_free_group", True) is False
        allocator.is_not_in_free_group = True
        try:
            super().evict(EvictParams(num_tokens=num_tokens))
        finally:
            if grouped:
                allocator.is_not_in_free_group = False
