"""Anchor pools (spec §1.6, §3, §5.3): per placeholder, insertion-ordered, LFU within the W oldest.

An anchor is one earlier observation of a placeholder's content (its base KV, the "embedding")
plus, per consumer agent that dense-prefilled a prompt containing it, the deviation
real - base of the content and of the consumer's template piece right after it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvcomm_sglang.config import KVCommConfig


@dataclass
class Deviation:
    """One consumer's real - base KV: of the content (L, l, H, D) and of its template piece
    right after it (L, P, H, D). Both are stored blocks (``kvblock.StoredKV`` or alike)."""

    content: object
    template: object

    @property
    def nbytes(self) -> int:
        return self.content.nbytes + self.template.nbytes


@dataclass
class Anchor:
    key: str                    # the content's segment key (the "message")
    emb: object                 # stored block: the content's base KV (L, l, H, D)
    deviations: dict[str, Deviation] = field(default_factory=dict)
    activations: int = 0

    @property
    def length(self) -> int:
        return self.emb.length

    @property
    def nbytes(self) -> int:
        return self.emb.nbytes + sum(d.nbytes for d in self.deviations.values())


class AnchorPool:
    """The anchors of one placeholder."""

    def __init__(self, placeholder: str, config: KVCommConfig, on_evict=None):
        self.placeholder = placeholder
        self.config = config
        self.on_evict = on_evict
        self.anchors: OrderedDict[str, Anchor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.anchors)

    def __contains__(self, key: str) -> bool:
        return key in self.anchors

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.anchors.values())

    def add(self, key: str, emb, consumer: str, deviation: Deviation) -> list[str]:
        """Record ``consumer``'s deviation for content ``key`` (spec §3); returns evicted keys.
        ``emb`` is the content's base block (its anchor embedding)."""
        if deviation.content.length != emb.length:
            raise ValueError(f"content deviation of {deviation.content.length} tokens does not "
                             f"match the {emb.length}-token embedding")
        evicted = []
        is_new = key not in self.anchors
        if is_new or self.config.evict_on_delta_update:
            limit = self.config.max_anchors - (1 if self.config.strict_pool_size and is_new else 0)
            if len(self.anchors) > limit:
                evicted.append(self.evict_one())
        if key not in self.anchors:
            self.anchors[key] = Anchor(key, emb)
        anchor = self.anchors[key]
        if not self.config.derotated_storage:      # official: the last updater's embedding wins
            anchor.emb = emb
        anchor.deviations[consumer] = deviation
        return evicted

    def evict_one(self, keep=frozenset()) -> str | None:
        """LFU among the W oldest anchors, first on ties (spec §5.3); anchors whose key is in
        ``keep`` (read by a live request) are passed over. -> the evicted key, None when every
        anchor is kept."""
        if not self.anchors:
            raise ValueError(f"anchor pool {self.placeholder!r} is empty: nothing to evict")
        window = [a for a in self.anchors.values() if a.key not in keep][: self.config.window]
        if not window:
            return None
        victim = min(window, key=lambda a: a.activations)
        del self.anchors[victim.key]
        if self.on_evict is not None:
            self.on_evict(victim)
        return victim.key

    def compatible(self, length: int, consumer: str | None = None) -> list[Anchor]:
        """Anchors at least ``length`` long that hold ``consumer``'s deviation (spec §4.1)."""
        return [a for a in self.anchors.values() if a.length >= length
                and (consumer is None or consumer in a.deviations)]

    def credit(self, keys) -> None:
        for key in keys:
            self.anchors[key].activations += 1


class AnchorRegistry:
    """All placeholder pools of one namespace, under one byte budget."""

    def __init__(self, config: KVCommConfig, on_evict=None):
        self.config = config
        self.on_evict = on_evict
        self.pools: dict[str, AnchorPool] = {}

    def pool(self, placeholder: str) -> AnchorPool:
        if placeholder not in self.pools:
            self.pools[placeholder] = AnchorPool(placeholder, self.config, self.on_evict)
        return self.pools[placeholder]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    @property
    def num_anchors(self) -> int:
        return sum(len(p) for p in self.pools.values())

    def enforce_budget(self) -> list[tuple[str, str]]:
        """Evict (LFU-in-window, from the largest pool) until under the byte budget."""
        evicted = []
        while self.nbytes > self.config.anchor_budget_bytes and self.num_anchors:
            pool = max(self.pools.values(), key=len)
            evicted.append((pool.placeholder, pool.evict_one()))
        return evicted
