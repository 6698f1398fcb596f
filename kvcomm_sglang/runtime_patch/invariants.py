"""The invariant checker (``KVCommConfig.debug_invariants``): after every scheduler batch it
proves what the design promises, and counts each violation in ``/metrics``
(``kvcomm_invariant_violations_total{check}``) and in ``InvariantChecker.counts``.

* ``ownership``: every store slot belongs to exactly one live block of the ledger; the store's
  token counts match its blocks; no store slot is free in the allocator or held by the tree.
* ``leak``: no ledger block is unreachable from its owner's state (a namespace's or an
  application's) and live decisions (``leaked_slots``); ``lost``: nothing an owner's state
  reaches was freed or is owned by another (``lost_anchors``: anchors of an application whose
  blocks are not all its own).
* ``exactness``: every tree node holding approximate slots is marked, and no live request
  that did not opt in holds an approximate slot in its row.
* ``budget``: the store within its budget, every namespace and application within its quota.
* ``pool`` (idle only): free + tree + store slots = the pool.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from kvcomm_sglang.runtime_patch.applications import Application

logger = logging.getLogger(__name__)
CHECKS = ("ownership", "leak", "lost", "exactness", "budget", "pool")


class InvariantChecker:
    def __init__(self, cache):
        self.cache, self.runtime = cache, cache.runtime
        self.allocator = cache.token_to_kv_pool_allocator
        self.approx: set[int] = set()            # slots holding approximate KV, independently
        self.counts: Counter[str] = Counter()
        self.checks = 0
        self.idle_checked = False
        self.leaked_slots = self.lost_anchors = 0
        free = self.allocator.free

        def free_and_forget(index):             # a freed slot holds nothing approximate
            self.approx.difference_update(_ints(index))
            return free(index)

        self.allocator.free = free_and_forget

    def approx_written(self, slots) -> None:
        self.approx.update(_ints(slots))

    def check(self, live_reqs=()) -> list[str]:
        """Run every check; -> the violations found (also counted and logged)."""
        live_reqs = list(live_reqs)
        found = (self._ownership() + self._reachability() + self._exactness(live_reqs)
                 + self._budget() + ([] if live_reqs else self._pool()))
        self.checks += 1
        self.idle_checked = not live_reqs        # an idle server is checked once per idle spell
        for check, message in found:
            self.counts[check] += 1
            logger.error("kvcomm invariant %s violated: %s", check, message)
        metrics = self.runtime.metrics
        if metrics is not None:
            metrics.invariants([check for check, _ in found], self.leaked_slots, self.lost_anchors)
        return [f"{check}: {message}" for check, message in found]

    # ---- the checks; each returns [(check, message)] ----
    def _ownership(self) -> list:
        store, out = self.runtime.store, []
        blocks = store.blocks()
        slots = np.concatenate([b.slots_np for b in blocks]) if blocks else np.empty(0, np.int64)
        if any(b.freed for b in blocks):
            out.append(("ownership", "a freed block is still in the ledger"))
        if len(np.unique(slots)) != len(slots):
            out.append(("ownership", "a store slot belongs to two blocks"))
        if store.tokens != len(slots) or sum(store.usage.values()) != len(slots):
            out.append(("ownership", f"store counts {store.tokens} tokens, its blocks "
                        f"{len(slots)}"))
        held = set(slots.tolist())
        if held & self._free_slots():
            out.append(("ownership", "a store slot is free in the allocator"))
        if held & self._tree_slots():
            out.append(("ownership", "a store slot is held by the radix tree"))
        return out

    def _reachability(self) -> list:
        runtime, store, out = self.runtime, self.runtime.store, []
        holders = runtime.namespaces.holders()
        live = set().union(*(runtime.decision_blocks(d) for d in runtime.decisions.values()
                             if d.ns is not None))
        self.leaked_slots = sum(b.length for o in store.ledger if o not in holders   # dropped
                                for i, b in store.ledger[o].items() if i not in live)
        self.lost_anchors = 0
        for holder in holders.values():
            reach = holder.reachable()
            pinned = runtime.pinned_blocks(holder)
            ledger = store.ledger.get(holder.owner, {})
            self.leaked_slots += sum(b.length for i, b in ledger.items()
                                     if i not in reach | pinned)
            if isinstance(holder, Application):
                self.lost_anchors += sum(1 for pool in holder.state.anchors.pools.values()
                                         for a in pool.anchors.values()
                                         if not _anchor_blocks(a) <= set(ledger))
            if not reach <= set(ledger):
                out.append(("lost", f"{holder.owner}: {len(reach - set(ledger))} blocks its "
                            "state reaches were freed or are not its own"))
        if self.leaked_slots:
            out.append(("leak", f"{self.leaked_slots} store slots no owner reaches"))
        return out

    def _exactness(self, live_reqs) -> list:
        out = []
        for node in self._nodes():
            if not getattr(node, "kvcomm_approx", False) and self.approx & set(_ints(node.value)):
                out.append(("exactness", f"unmarked node holds approximate slots {node.key}"))
        rows = self.cache.req_to_token_pool.req_to_token
        for req in live_reqs:
            idx = getattr(req, "req_pool_idx", None)
            if idx is None or self.cache.is_opted_in(req):
                continue
            n = len(req.origin_input_ids) + len(getattr(req, "output_ids", ()))
            if self.approx & set(_ints(rows[idx, :n])):
                out.append(("exactness", f"request {req.rid} did not opt in but holds "
                            "approximate KV"))
        return out

    def _budget(self) -> list:
        store, out = self.runtime.store, []
        if store.tokens > store.max_tokens:
            out.append(("budget", f"store holds {store.tokens} > {store.max_tokens} tokens"))
        over = [o for o, n in store.usage.items() if n > store.quota_tokens]
        if over:
            out.append(("budget", f"namespaces or applications over their quota: {over}"))
        return out

    def _pool(self) -> list:
        cache, allocator = self.cache, self.allocator
        if getattr(allocator, "is_not_in_free_group", True) is False:
            return []
        total = allocator.available_size() + cache.evictable_size() + cache.protected_size()
        if total != allocator.size:
            return [("pool", f"free + tree + store = {total}, the pool has {allocator.size}")]
        return []

    # ---- helpers ----
    def _nodes(self):
        stack = list(self.cache.root_node.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _tree_slots(self) -> set[int]:
        return {s for node in self._nodes() for s in _ints(node.value)}

    def _free_slots(self) -> set[int]:
        allocator = self.allocator
        parts = [allocator.free_pages, getattr(allocator, "release_pages", [])]
        return {s for part in parts for s in _ints(part)}


def _anchor_blocks(anchor) -> set[int]:
    ids = {id(anchor.emb)}
    for deviation in anchor.deviations.values():
        ids.update((id(deviation.content), id(deviation.template)))
    return ids


def _ints(index) -> list[int]:
    if index is None:
        return []
    if hasattr(index, "tolist"):
        return [int(x) for x in index.reshape(-1).tolist()]
    return [int(x) for x in index]
