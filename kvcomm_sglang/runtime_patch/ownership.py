"""What live requests pin, and the sweeps that free every other unreachable store block
(DESIGN §4, "one owner per slot"; docs/isolation.md). Part of ``KVCommRuntime``.

Store blocks have two kinds of owners: workflow namespaces (their messages' base KV) and
applications (templates and anchors). A live decision pins blocks of both: the plan's pieces and
anchors, its messages' base KV, and its consuming template.
"""

from __future__ import annotations


class Ownership:
    """Mixin of ``KVCommRuntime``: needs ``store``, ``namespaces``, ``applications`` and
    ``decisions``."""

    def live_decisions(self, holder) -> list:
        """The live decisions of ``holder``'s requests (a namespace, or an application: any of
        its workflows)."""
        return [d for d in self.decisions.values() if d.ns is not None
                and (d.ns is holder or d.ns.app is holder)]

    def pinned_state(self, holder) -> tuple[set[str], set[str]]:
        """Content keys and template keys that live requests of ``holder`` were decided with."""
        live = self.live_decisions(holder)
        return ({k for d in live for k in d.keys.values()}, {d.template for d in live})

    def pinned_blocks(self, holder) -> set[int]:
        """Ids of the store blocks live requests of ``holder`` pin (``decision_blocks``)."""
        return set().union(*map(self.decision_blocks, self.live_decisions(holder)))

    def pinned_tokens(self) -> int:
        """Store tokens that no eviction can free now (what live requests were decided with):
        they count as protected, not evictable, in the radix cache's sizes, or SGLang would
        admit a request on room that eviction cannot make."""
        pinned = set()
        for decision in self.decisions.values():
            ns = decision.ns
            if ns is None or ns.name not in self.namespaces:
                continue
            blocks = {**self.store.ledger.get(ns.owner, {}),
                      **self.store.ledger.get(ns.app.owner, {})}
            pinned.update((i, blocks[i].length) for i in self.decision_blocks(decision)
                          if i in blocks)
        return sum(length for _, length in pinned)

    def pinned_namespaces(self) -> set[str]:
        return {d.ns.name for d in self.decisions.values() if d.ns is not None}

    def sweep(self, holder, keep_state: bool = True) -> int:
        """Free ``holder``'s store blocks (a namespace's or an application's) that neither its
        state (unless ``keep_state`` is False or it was dropped) nor a live decision reaches;
        -> tokens freed."""
        keep = holder.reachable() if keep_state and not holder.dropped else set()
        return self.store.sweep(holder.owner, keep | self.pinned_blocks(holder))

    def sweep_workflow(self, ns) -> int:
        """Sweep a namespace and its application (a request of it changed either)."""
        return self.sweep(ns) + self.sweep(ns.app)

    def decision_blocks(self, decision) -> set[int]:
        """Ids of the store blocks a live decision pins: what its plan reads, its messages'
        base KV and its consuming template (one rule for sweeps, sizes and the checker)."""
        ns, ids = decision.ns, decision.pinned_blocks()
        template = ns.app.state.templates.get(decision.template)
        if template is not None:
            ids.update(id(piece) for piece in template.pieces)
        ids.update(id(ns.state.contents[k].kv) for k in decision.keys.values()
                   if k in ns.state.contents)
        return ids

    def _make_store_room(self, owner: str, tokens: int) -> None:
        self.namespaces.make_store_room(owner, tokens)

    def evict_store(self, num_tokens: int) -> int:
        """SGLang's pool needs room: free store slots (idle workflows first, then the largest
        holders: ``NamespaceTable.evict_largest_first``)."""
        return self.namespaces.evict_largest_first(num_tokens)

    def drop_namespace(self, name: str) -> None:
        self.namespaces.drop(name)
