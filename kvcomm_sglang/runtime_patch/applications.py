"""Applications: what the workflows of one application share on a server (docs/isolation.md).

An application (the ``<application id>`` of a ``kvcomm:<application id>.<workflow id>``
namespace; a namespace without one is an application of its own) owns its agents' templates and
its anchor pools, in store blocks owned by ``Application.owner``. Every workflow naming it plans
with those templates and anchors and feeds them with its dense prefills, so a new workflow of a
warm application reuses from its first call. Bounds, like the workflows':
* at most ``max_applications``; a new one replaces only an application no workflow uses, idle
  for ``namespace_idle_s`` and pinned by no request, else the request computes densely
  (``namespace_limit``);
* an application holds at most the store quota of one namespace; over it, it evicts its own
  anchors, then templates;
* under store pressure it gives room like a workflow (the largest holder first).
An application of its own (no application id) goes with its workflow.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict

from kvcomm_sglang.application import ApplicationState

OWNER_PREFIX = "app:"       # store ledger owners: workflow namespaces, and "app:" + application id


class Application:
    def __init__(self, key: str, runtime, implicit: bool):
        self.key, self.implicit = key, implicit
        self.owner = OWNER_PREFIX + key
        self.state = ApplicationState(runtime.config, runtime.rope, key,
                                      make_kv=functools.partial(runtime.store.make,
                                                                owner=self.owner),
                                      on_evict=self._anchor_evicted)
        self.version = 0
        self.last_used = time.monotonic()
        self.dropped = False            # dropped: its blocks live only while requests pin them

    def _anchor_evicted(self, anchor) -> None:
        self.version += 1           # its blocks go at the next sweep, unless a plan pins them

    def drop_template(self, key: str) -> None:
        del self.state.templates[key]
        self.version += 1

    def reachable(self) -> set[int]:
        """Ids of every store block this application's state holds."""
        ids = set()
        for template in self.state.templates.values():
            ids.update(id(piece) for piece in template.pieces)
        for pool in self.state.anchors.pools.values():
            for anchor in pool.anchors.values():
                ids |= _blocks(anchor)
        return ids

    def eviction_steps(self, pinned_templates: set[str], pinned_blocks: set[int]) -> list:
        """What gives room, in order: anchors no live request reads (LFU within the window of
        the largest pool), then templates no live request was decided with. Evicting a pinned
        anchor would free nothing now and lose it for every later request."""
        evict = functools.partial(self._evict_one_anchor, pinned_blocks)
        steps = [evict] * self.state.anchors.num_anchors
        return steps + [functools.partial(self.drop_template, key)
                        for key in list(self.state.templates) if key not in pinned_templates]

    def _evict_one_anchor(self, pinned_blocks: set[int]) -> None:
        for pool in sorted(self.state.anchors.pools.values(), key=len, reverse=True):
            keep = {a.key for a in pool.anchors.values() if _blocks(a) & pinned_blocks}
            if len(pool) > len(keep) and pool.evict_one(keep) is not None:
                return


class ApplicationTable:
    """The runtime's applications (least recently used first) and their bound."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.items: OrderedDict[str, Application] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def values(self) -> list[Application]:
        return list(self.items.values())

    def get(self, key: str, implicit: bool) -> Application | None:
        """The application, created if allowed; None when the table is full of applications
        in use."""
        app = self.items.get(key)
        if app is None:
            config = self.runtime.config
            if len(self.items) >= config.max_applications and not self._drop_one_idle():
                return None
            app = self.items[key] = Application(key, self.runtime, implicit)
        self.items.move_to_end(key)
        app.last_used = time.monotonic()
        return app

    def in_use(self) -> set[str]:
        """Applications a workflow of the namespace table or a live request names."""
        used = {ns.app.key for ns in self.runtime.namespaces.values()}
        return used | {d.ns.app.key for d in self.runtime.decisions.values() if d.ns is not None}

    def _drop_one_idle(self) -> bool:
        cutoff = time.monotonic() - self.runtime.config.namespace_idle_s
        used = self.in_use()
        for key, app in self.items.items():
            if app.last_used <= cutoff and key not in used:
                self.drop(key)
                return True
        return False

    def drop(self, key: str) -> None:
        app = self.items.pop(key)
        app.version += 1
        app.dropped = True
        try:
            if self.runtime.persistence is not None:
                self.runtime.persistence.park(app)      # a warm application outlives its slots
        finally:
            self.runtime.sweep(app, keep_state=False)


def _blocks(anchor) -> set[int]:
    """Ids of an anchor's store blocks: its embedding and every consumer's deviations."""
    ids = {id(anchor.emb)}
    for deviation in anchor.deviations.values():
        ids.update((id(deviation.content), id(deviation.template)))
    return ids
