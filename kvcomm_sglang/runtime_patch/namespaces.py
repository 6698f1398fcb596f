"""Workflow namespaces: what each workflow owns, how many exist, and who gives room when the
segment store is full (docs/isolation.md).

A namespace (the request's ``extra_key``, ``kvcomm:<workflow secret>`` or
``kvcomm:<application secret>.<workflow secret>``) owns its messages' base KV, in store blocks
owned by its name; its agents' templates and the anchors are its application's
(``applications.py``), shared with the application's other workflows. A block lives while its
owner's state reaches it or a live request's decision pins it (``reachable``); every change
ends with a sweep that frees the rest. Bounds:
* at most ``max_namespaces``; a new one replaces only a namespace idle for
  ``namespace_idle_s`` and pinned by no request, else the request computes densely
  (``namespace_limit``): flooding namespaces cannot wipe active workflows;
* a namespace (and an application) holds at most its quota of store tokens: over it, it evicts
  its own state only;
* when the whole store is full, the workflows no live request uses give room first, least
  recently used first; then the holder (namespace or application) holding the most, so one
  within its fair share is the last to lose anything.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict

from kvcomm_sglang.planner import KVCommState
from kvcomm_sglang.protocol import split_namespace


class Namespace:
    def __init__(self, name: str, runtime, app):
        self.name, self.runtime, self.app = name, runtime, app
        self.owner = name
        self.state = KVCommState(runtime.config, runtime.rope, name,
                                 make_kv=functools.partial(runtime.store.make, owner=name),
                                 matcher=runtime.matcher, cache=runtime.match_cache,
                                 app=app.state)
        self.messages: OrderedDict[str, str] = OrderedDict()     # message id -> content key
        self.version = 0
        self.last_used = time.monotonic()
        self.dropped = False            # dropped: its blocks live only while requests pin them

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

    def reachable(self) -> set[int]:
        """Ids of every store block this namespace's state holds (its messages' base KV)."""
        return {id(content.kv) for content in self.state.contents.values()}

    def eviction_steps(self, pinned_keys: set[str]) -> list:
        """What gives room, in order: its least recently bound messages no live request uses."""
        return [functools.partial(self.drop_message, m) for m in list(self.messages)
                if self.messages[m] not in pinned_keys]


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
        """The namespace, created (in its application) if allowed; None when the table, or the
        application table, is full of active ones."""
        ns = self.items.get(name)
        if ns is None:
            if not create or (len(self.items) >= self.config.max_namespaces
                              and not self._drop_one_idle()):
                return None
            application, workflow = split_namespace(name)
            app = self.runtime.applications.get(application, implicit=application == workflow)
            if app is None:
                return None
            ns = self.items[name] = Namespace(name, self.runtime, app)
        self.items.move_to_end(name)
        ns.last_used = ns.app.last_used = time.monotonic()
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
        ns.dropped = True
        self.runtime.sweep(ns, keep_state=False)
        apps = self.runtime.applications
        if ns.app.implicit and ns.app.key in apps and ns.app.key not in apps.in_use():
            apps.drop(ns.app.key)                   # an application of its own goes with it

    # ---- room in the store ----
    def holders(self) -> dict:
        """Every store owner with state: namespaces and applications, by ledger owner name."""
        holders = {ns.owner: ns for ns in self.items.values()}
        holders.update((app.owner, app) for app in self.runtime.applications.values())
        return holders

    def make_store_room(self, owner: str, tokens: int) -> None:
        """``owner`` needs ``tokens`` more store slots: first its own quota, then the budget."""
        store = self.runtime.store
        over_quota = store.usage[owner] + tokens - store.quota_tokens
        holder = self.holders().get(owner)
        if over_quota > 0 and holder is not None:
            self.evict_within(holder, over_quota)
        over_budget = store.tokens + tokens - store.max_tokens
        if over_budget > 0:
            self.evict_largest_first(over_budget)

    def evict_largest_first(self, tokens: int) -> int:
        """Free ``tokens`` store slots: first from the workflows no live request uses, least
        recently used first (a finished workflow's messages are read by nobody again), then
        from every holder, the one holding the most first. An application only gives room in
        that second pass: its templates and anchors serve every new workflow, and a warm
        application is the largest holder, so largest-first alone gave it up for finished
        workflows' messages."""
        usage, pinned = self.runtime.store.usage, self.runtime.pinned_namespaces()
        idle = [ns for ns in self.items.values() if ns.name not in pinned]   # oldest first
        rest = sorted(self.holders().values(), key=lambda h: -usage[h.owner])
        freed = 0
        for holder in idle + rest:
            if freed >= tokens:
                break
            freed += self.evict_within(holder, tokens - freed)
        return freed

    def evict_within(self, holder, tokens: int) -> int:
        """Free up to ``tokens`` of ``holder``'s slots (a namespace: its least recently bound
        messages; an application: anchors, largest pool first, then templates); never what a
        live request pinned."""
        runtime, freed = self.runtime, 0
        keys, templates = runtime.pinned_state(holder)
        steps = holder.eviction_steps(keys) if isinstance(holder, Namespace) else \
            holder.eviction_steps(templates, runtime.pinned_blocks(holder))
        for step in steps:
            if freed >= tokens:
                break
            step()
            freed += runtime.sweep(holder)
        return freed
