"""What an application learns, shared by every workflow of it: its agents' templates, keyed by
the templates' tokens, and the anchor pools (spec §3, §5.3).

A workflow (``planner.KVCommState``) owns its messages' base KV and plans its requests; the
templates it consumes and the anchors that vouch for its messages belong to its application,
so a new workflow of a warm application reuses from its first call. An anchor holds KV computed
from an earlier request's text: an application is shared only by workflows that name it by its
secret (docs/isolation.md).

A template is found by its tokens (``template_key``): the same agent prompt in two workflows is
one template, and the deviations its dense prefills leave in the anchors are keyed by it.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch

from kvcomm_sglang.anchors import AnchorRegistry, Deviation
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.kvblock import StoredKV
from kvcomm_sglang.rope import RopeSpec, rotate


def template_key(piece_ids, placeholders) -> str:
    """The identity of an agent template: a hash of its text pieces' ids x0..xn and its
    placeholders (deterministic across processes and TP ranks)."""
    digest = hashlib.blake2b(digest_size=16)
    for ids in piece_ids:
        digest.update(",".join(map(str, ids)).encode() + b"\x00")
    digest.update(b"\x01" + "|".join(placeholders).encode())
    return digest.hexdigest()


@dataclass
class AgentTemplate:
    agent: str                           # the key it is stored under (``template_key`` on a server)
    piece_ids: list[tuple[int, ...]]     # x0..xn token ids
    placeholders: list[str]              # phi1..phin
    pieces: list                         # template-pass KV of x0..xn (stored blocks)

    @property
    def key(self) -> str:
        return template_key(self.piece_ids, self.placeholders)


class ApplicationState:
    def __init__(self, config: KVCommConfig, rope: RopeSpec, key: str = "", make_kv=StoredKV,
                 on_evict=None):
        """``make_kv(k, v, positions)`` builds the application's stored blocks (templates,
        anchor embeddings and deviations); ``on_evict(anchor)`` is told of every dropped anchor."""
        self.config, self.rope, self.key = config, rope, key
        self.make_kv, self.on_evict = make_kv, on_evict
        self.templates: dict[str, AgentTemplate] = {}
        self.anchors = AnchorRegistry(config, self._anchor_evicted)
        self.workflows = weakref.WeakSet()      # workflow states whose caches name its anchors

    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """KV computed at ``positions`` -> an application block (de-rotated, or as is)."""
        if self.config.derotated_storage:
            return self.make_kv(rotate(k, -positions, self.rope), v, torch.zeros_like(positions))
        return self.make_kv(k, v, positions)

    def register_template(self, agent: str, piece_ids, placeholders, k: torch.Tensor,
                          v: torch.Tensor, piece_spans) -> AgentTemplate:
        """Template pass KV (L, N, H, D) over x0 s1 x1 ... (stand-ins); piece_spans: x_i spans."""
        if len(piece_ids) != len(placeholders) + 1 or len(piece_spans) != len(piece_ids):
            raise ValueError("a template needs n+1 text pieces and spans for n placeholders")
        pieces = []
        for ids, (s, e) in zip(piece_ids, piece_spans):
            if e - s != len(ids) or s < 0 or e > k.shape[1]:
                raise ValueError(f"template piece span ({s}, {e}) does not fit {len(ids)} ids "
                                 f"in {k.shape[1]} template tokens")
            pieces.append(self.store(k[:, s:e], v[:, s:e], torch.arange(s, e)))
        template = AgentTemplate(agent, [tuple(map(int, p)) for p in piece_ids],
                                 list(placeholders), pieces)
        self.templates[agent] = template
        return template

    def add_anchor(self, placeholder: str, key: str, base, consumer: str,
                   deviation: Deviation, emb=None) -> list[str]:
        """``consumer``'s deviation for content ``key`` (base block ``base``); a new anchor's
        embedding is ``emb`` (official frame) or a copy of ``base`` in the application's own
        blocks (de-rotated: the embedding is the base itself, but the workflow owns that block).
        -> evicted keys."""
        pool = self.anchors.pool(placeholder)
        if emb is None:
            known = pool.anchors.get(key)
            emb = known.emb if known is not None else self.make_kv(base.k, base.v, base.positions)
        return pool.add(key, emb, consumer, deviation)

    def _anchor_evicted(self, anchor) -> None:
        for workflow in list(self.workflows):
            workflow.anchor_evicted(anchor)
        if self.on_evict is not None:
            self.on_evict(anchor)
