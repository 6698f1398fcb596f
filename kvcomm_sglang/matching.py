"""Distances of a content to anchors and the softmax weights they give (spec §4.2), cached on
contents under one byte budget (``MatchCache``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvcomm_sglang.estimator import (gate_distances, placeholder_distances, prefix_distances,
                                     softmax_weights)
from kvcomm_sglang.kvblock import StoredKV


@dataclass
class Match:
    """Distances of a content (T tokens) to one anchor: what the weights come from (spec §4.2).
    ``packed`` holds ph_k, ph_v, pf_k, pf_v back to back (the four are views of it), so the
    weights of an anchor set are one stack and one softmax over the anchor axis."""

    ph_k: torch.Tensor        # (T,) head-aligned mean |diff| of K
    ph_v: torch.Tensor        # (T,)
    pf_k: torch.Tensor        # (L, H, D) tail-aligned L2 of K over tokens
    pf_v: torch.Tensor        # (L, H, D)
    gate_v: torch.Tensor      # () Frobenius distance of V, head-aligned (spec §5.1)
    packed: torch.Tensor      # (2T + 2LHD,)
    nbytes: int = 0           # of packed

    @classmethod
    def batch(cls, ph_k, ph_v, pf_k, pf_v, gate_v) -> list["Match"]:
        """One Match per anchor row of a matcher's five (A, ...) tensors (one cat for all)."""
        packed = torch.cat([ph_k, ph_v, pf_k.flatten(1), pf_v.flatten(1)], dim=1).float()
        nbytes = _nbytes(packed[0]) if len(packed) else 0
        return [cls(*unpack(row, ph_k.shape[1], pf_k.shape[1:]), gate_v[i], row, nbytes)
                for i, row in enumerate(packed)]


class AnchorWeights(NamedTuple):
    """Softmax weights of one content against one anchor set (spec §4.2)."""

    token_k: torch.Tensor      # (A, T) per-token weights of the content's own tokens
    token_v: torch.Tensor
    channel_k: torch.Tensor    # (A, L, H, D) per-channel weights of the template piece after it
    channel_v: torch.Tensor
    packed: torch.Tensor       # (A, 2T + 2LHD): the four above back to back (they are views)


def set_weights(matches: list[Match], tokens: int, temperature: float = 1.0) -> AnchorWeights:
    """One stack and one softmax over the anchor axis of the packed distance rows."""
    packed = softmax_weights(torch.stack([m.packed for m in matches]), temperature)
    return AnchorWeights(*unpack(packed, tokens, matches[0].pf_k.shape), packed)


def unpack(packed: torch.Tensor, tokens: int, channel_shape) -> tuple[torch.Tensor, ...]:
    """(..., 2T + 2LHD) -> views ph_k, ph_v (..., T), pf_k, pf_v (..., L, H, D)."""
    lead, size = packed.shape[:-1], (packed.shape[-1] - 2 * tokens) // 2
    ph_k, ph_v, pf_k, pf_v = packed.split([tokens, tokens, size, size], dim=-1)
    return ph_k, ph_v, pf_k.view(*lead, *channel_shape), pf_v.view(*lead, *channel_shape)


def reference_match(kv: StoredKV, embs: list, dtype: str = "float32"):
    """Distances of stored block ``kv`` (T tokens) to anchor embeddings ``embs`` (each >= T long):
    ph_k, ph_v (A, T), pf_k, pf_v (A, L, H, D), gate_v (A,). The meaning of every matcher
    (``kernels.distances.anchor_distances`` computes the same from pool slots)."""
    t, k, v = kv.length, kv.k, kv.v
    heads_k = torch.stack([e.k[:, :t] for e in embs])
    heads_v = torch.stack([e.v[:, :t] for e in embs])
    tails_k = torch.stack([e.k[:, e.length - t:] for e in embs])
    tails_v = torch.stack([e.v[:, e.length - t:] for e in embs])
    return (placeholder_distances(k, heads_k, dtype), placeholder_distances(v, heads_v, dtype),
            prefix_distances(k, tails_k, dtype), prefix_distances(v, tails_v, dtype),
            gate_distances(v, heads_v, dtype))


MAX_WEIGHT_SETS = 8        # softmax weights kept per content (distinct anchor sets)


class MatchCache:
    """The byte budget of what contents cache outside the KV pool (their distances to anchors
    and their softmax weights), shared by every namespace of a server. Over budget, the least
    recently used contents lose both caches; a later plan computes them again. ``used`` can
    exceed the budget only by the caches of the one content being updated. A content is a
    ``planner.Content``: its ``matches``, ``weights`` and ``cache_nbytes`` are what is bounded."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.entries: OrderedDict[int, tuple[object, int]] = OrderedDict()   # LRU first
        self.dropped = 0                                    # contents whose caches were dropped

    def update(self, content, used: bool = True) -> None:
        """``content``'s caches changed, or were used (``used``: it becomes the most recent)."""
        key = id(content)
        old = self.entries.get(key)
        self.used -= old[1] if old is not None else 0
        if content.cache_nbytes:
            self.entries[key] = (content, content.cache_nbytes)   # a known key keeps its place
            if used:
                self.entries.move_to_end(key)
            self.used += content.cache_nbytes
        elif old is not None:
            del self.entries[key]
        while self.used > self.budget and len(self.entries) > 1:
            oldest = next(iter(self.entries))
            if oldest == key:
                self.entries.move_to_end(key)
                oldest = next(iter(self.entries))
            victim, size = self.entries.pop(oldest)
            self.used -= size
            victim.matches, victim.weights, victim.cache_nbytes = {}, {}, 0
            self.dropped += 1

    def forget(self, content) -> None:
        old = self.entries.pop(id(content), None)
        if old is not None:
            self.used -= old[1]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
