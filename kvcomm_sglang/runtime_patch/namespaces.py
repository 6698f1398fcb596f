"""Workflow namespaces: what each workflow owns, how many exist, and who gives room when the
segment store is full (docs/isolation.md).

A namespace (the request's ``extra_key``, ``kvcomm:<workflow secret>``) owns its agents'
templates, its messages' base KV and its anchors, all in store blocks owned by its name. Its
blocks live while its state reaches them or a live request's decision pins them
(``Namespace.reachable``); every change ends with a sweep that frees the rest. Bounds:
* at most ``max_namespaces``; a new one replaces only a namespace idle for
  ``namespace_idle_s`` and pinned by no request, else the request computes densely
  (``namespace_limit``): flooding namespaces cannot wipe active workflows;
* a namespace holds at most its quota of store tokens: over it, it evicts its own state only;
* when the whole store is full, the namespace holding the most gives room first, so a
  workflow within its fair share is the last to lose anything.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict

from kvcomm_sglang.planner import KVCommState


class Namespace:
    def __init__(self, name: str, runtime):
        self.name, self.runtime = name, runtime
        self.state = KVCommState(runtime.config, runtime.rope, name,
                                 make_kv=functools.partial(runtime.store.make, owner=name),
                                 on_evict=self._anchor_evicted, matcher=runtime.matcher,
                                 cache=runtime.match_cache)
        self.messages: OrderedDict[str, str] = OrderedDict()     # message id -> content key
        self.version = 0
        self.last_used = time.monotonic()

    def bind(self, message: str, key: str) -> None:
        old = self.messages.pop(message, None)
        self.messages[message] = key
        if old is not None and old != key and old not in self.messages.values():
            self.state.drop_content(old)
        self.version += 1

    def drop_message(self, message: str) -> None:
        key = self.messages.pop(message)
        if key not in self.messages.values():
            self.state.drop_content(key)
        self.version += 1

    def drop_template(self, agent: str) -> None:
        del self.state.templates[agent]
        self.version += 1

    def _anchor_evicted(self, anchor) -> None:
        self.version += 1           # its blocks go at the next sweep, unless a plan pins them

    def reachable(self) -> set[int]:
        """Ids of every store block this namespace's state holds."""
        ids = set()
        for template in self.state.templates.values():
            ids.update(id(piece) for piece in template.pieces)
        ids.update(id(content.kv) for content in self.state.contents.values())
        for pool in self.state.anchors.pools.values():
            for anchor in pool.anchors.values():
                ids.add(id(anchor.emb))
                for deviation in anchor.deviations.values():
                    ids.update((id(deviation.content), id(deviation.template)))
        return ids


class NamespaceTable:
    """The runtime's namespaces (least recently used first), their bounds and eviction."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.items: OrderedDict[str, Namespace] = OrderedDict()

    @property
    def config(self):
        return self.runtime.config

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, name: str) -> Namespace:
        return self.items[name]

    def values(self):
        return list(self.items.values())

    def get(self, name: str, create: bool = True) -> Namespace | None:
        """The namespace, created if allowed; None when the table is full of active ones."""
        ns = self.items.get(name)
        if ns is None:
            if not create or (len(self.items) >= self.config.max_namespaces
                              and not self._drop_one_idle()):
                return None
            ns = self.items[name] = Namespace(name, self.runtime)
        self.items.move_to_end(name)
        ns.last_used = time.monotonic()
        return ns

    def _drop_one_idle(self) -> bool:
        cutoff = time.monotonic() - self.config.namespace_idle_s
        pinned = self.runtime.pinned_namespaces()
        for name, ns in self.items.items():
            if ns.last_used <= cutoff and name not in pinned:
                self.drop(name)
                return True
        return False

    def drop(self, name: str) -> None:
        ns = self.items.pop(name)
        ns.state.release_caches()
        ns.version += 1
        self.runtime.sweep(ns, keep_state=False)

    # ---- room in the store ----
    def make_store_room(self, owner: str, tokens: int) -> None:
        """``owner`` needs ``tokens`` more store slots: first its own quota, then the budget."""
        store = self.runtime.store
        over_quota = store.usage[owner] + tokens - store.quota_tokens
        if over_quota > 0 and owner in self.items:
            self.evict_within(self.items[owner], over_quota)
        over_budget = store.tokens + tokens - store.max_tokens
        if over_budget > 0:
            self.evict_largest_first(over_budget)

    def evict_largest_first(self, tokens: int) -> int:
        """Free ``tokens`` store slots, taking from the namespaces holding the most first."""
        usage = self.runtime.store.usage
        freed = 0
        for name in sorted(self.items, key=lambda n: -usage[n]):
            if freed >= tokens:
                break
            freed += self.evict_within(self.items[name], tokens - freed)
        return freed

    def evict_within(self, ns: Namespace, tokens: int) -> int:
        """Free up to ``tokens`` of ``ns``'s slots: its least recently bound messages, then
        anchors (largest pool first), then templates; never what a live request pinned."""
        runtime, freed = self.runtime, 0
        keys, agents = runtime.pinned_state(ns)
        steps = [lambda m=m: ns.drop_message(m) for m in list(ns.messages)
                 if ns.messages[m] not in keys]
        steps += [lambda: _evict_one_anchor(ns)] * ns.state.anchors.num_anchors
        steps += [lambda a=a: ns.drop_template(a) for a in list(ns.state.templates)
                  if a not in agents]
        for step in steps:
            if freed >= tokens:
                break
            step()
            freed += runtime.sweep(ns)
        return freed


def _evict_one_anchor(ns: Namespace) -> None:
    pools = [p for p in ns.state.anchors.pools.values() if len(p)]
    if pools:
        max(pools, key=len).evict_one()
