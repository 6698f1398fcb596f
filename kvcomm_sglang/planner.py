"""ReusePlan for one consumer call, or a Fallback with its reason (spec §5.2, §2.5, §4, §3).

``KVCommState`` holds, for one namespace, the agents' template KV, the shared contents' base KV
and the anchor pools. Stored KV keeps the positions of its frame: all zeros when de-rotated
(DESIGN §4), the positions where it was computed in the official (absolute) mode.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvcomm_sglang.anchors import AnchorRegistry, Deviation
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.kvblock import StoredKV
from kvcomm_sglang.estimator import (GateResult, entropy_gate, gate_distances,
                                     gate_from_distances, placeholder_distances,
                                     prefix_distances, softmax_weights)
from kvcomm_sglang.rope import RopeSpec, rotate
from kvcomm_sglang.segments import PromptLayout, segment_key


@dataclass
class AgentTemplate:
    agent: str
    piece_ids: list[tuple[int, ...]]     # x0..xn token ids
    placeholders: list[str]              # phi1..phin
    pieces: list[StoredKV]               # template-pass KV of x0..xn


@dataclass
class Content:
    key: str
    placeholder: str
    token_ids: tuple[int, ...]
    kv: StoredKV
    gate: GateResult = None
    # de-rotated storage only: distances to anchors (anchor key -> Match), computed once (at
    # capture for the anchors then in the pool, at the first plan for later ones), and the
    # softmax weights per anchor set; a request then only selects rows
    matches: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    cache_nbytes: int = 0     # bytes of the two caches above (``MatchCache`` bounds them)


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


@dataclass
class PiecePlan:
    kind: str                 # "content" | "template"
    placeholder: str          # content: the one it fills; template: the one before it
    source: StoredKV
    start: int                # first destination position
    anchors: list = field(default_factory=list)   # Anchor objects (same order as weights)
    weights_k: torch.Tensor | None = None         # content (A, T); template (A, L, H, D)
    weights_v: torch.Tensor | None = None
    packed: torch.Tensor | None = None            # de-rotated mode: AnchorWeights.packed, which
                                                  # weights_k / weights_v are views of


@dataclass
class ReusePlan:
    consumer: str
    layout: PromptLayout
    pieces: list[PiecePlan]               # every piece after x0, in prompt order

    @property
    def reused_tokens(self) -> int:
        return self.layout.total_length - self.layout.prefix_length


@dataclass
class Fallback:
    reason: str
    learn: list[str] = field(default_factory=list)   # placeholders whose anchors the dense run feeds


MAX_WEIGHT_SETS = 8        # softmax weights kept per content (distinct anchor sets)


class MatchCache:
    """The byte budget of what contents cache outside the KV pool (their distances to anchors
    and their softmax weights), shared by every namespace of a server. Over budget, the least
    recently used contents lose both caches; a later plan computes them again. ``used`` can
    exceed the budget only by the caches of the one content being updated."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.entries: OrderedDict[int, tuple[Content, int]] = OrderedDict()   # LRU first
        self.dropped = 0                                    # contents whose caches were dropped

    def update(self, content: Content, used: bool = True) -> None:
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

    def forget(self, content: Content) -> None:
        old = self.entries.pop(id(content), None)
        if old is not None:
            self.used -= old[1]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class KVCommState:
    def __init__(self, config: KVCommConfig, rope: RopeSpec, namespace: str = "",
                 make_kv=StoredKV, on_evict=None, matcher=None, cache: MatchCache | None = None):
        """``make_kv(k, v, positions)`` builds every stored block (default: plain tensors);
        ``on_evict(anchor)`` is told of every anchor the pools drop; ``matcher(kv, embs)`` returns
        ``reference_match``'s five tensors (default: ``reference_match``); ``cache`` bounds the
        contents' distances and weights (default: this state's own, ``match_cache_bytes``)."""
        self.config, self.rope, self.namespace = config, rope, namespace
        self.make_kv = make_kv
        self.matcher = matcher
        self.cache = cache if cache is not None else MatchCache(config.match_cache_bytes)
        self.on_evict = on_evict
        self.templates: dict[str, AgentTemplate] = {}
        self.contents: dict[str, Content] = {}
        self.anchors = AnchorRegistry(config, self._anchor_evicted)

    def _anchor_evicted(self, anchor) -> None:
        for content in self.contents.values():
            match = content.matches.pop(anchor.key, None)
            if match is not None:
                gone = [k for k in content.weights if anchor.key in k]
                content.cache_nbytes -= match.nbytes + sum(
                    _nbytes(content.weights.pop(k).packed) for k in gone)
                self.cache.update(content, used=False)
        if self.on_evict is not None:
            self.on_evict(anchor)

    # ---- storage ----
    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> StoredKV:
        """KV computed at ``positions`` -> stored form (de-rotated, or as is when faithful)."""
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
        template = AgentTemplate(agent, [tuple(map(int, p)) for p in piece_ids], list(placeholders),
                                 pieces)
        self.templates[agent] = template
        return template

    def register_content(self, placeholder: str, token_ids, k: torch.Tensor, v: torch.Tensor,
                         positions: torch.Tensor) -> Content:
        """A new shared segment: store its base KV and predict whether anchors can vouch for it."""
        if len(token_ids) != k.shape[1]:
            raise ValueError(f"{len(token_ids)} content ids but {k.shape[1]} KV tokens")
        key = segment_key(token_ids, self.namespace + "|" + placeholder)
        pool = self.anchors.pool(placeholder)
        cfg = self.config
        content = Content(key, placeholder, tuple(map(int, token_ids)), self.store(k, v, positions))
        anchors = list(pool.anchors.values())
        if cfg.derotated_storage:            # one batched match: the gate and the later weights
            available = tuple(i for i, a in enumerate(anchors) if a.length >= content.kv.length)
            dist = None
            if len(anchors) >= cfg.min_anchors and len(available) >= cfg.min_anchors:
                self._match(content, [anchors[i] for i in available])
                dist = torch.stack([content.matches[anchors[i].key].gate_v for i in available])
            gate = gate_from_distances(dist, len(anchors), available, cfg.gamma, cfg.top_p,
                                       cfg.top_p_credit, cfg.min_anchors, cfg.temperature)
        else:
            gate = entropy_gate(v, [a.emb.v for a in anchors], cfg.gamma, cfg.top_p,
                                cfg.top_p_credit, cfg.min_anchors, cfg.temperature,
                                cfg.distance_dtype)
        if key in pool:                      # the same message again: its own anchor vouches
            gate = GateResult(False, "known_anchor", 0.0)
        keys = list(pool.anchors)
        pool.credit(keys[i] for i in gate.credited)
        content.gate = gate
        replaced = self.contents.get(key)
        if replaced is not None:
            self.cache.forget(replaced)
        self.contents[key] = content
        self.prepare_weights(content)
        return content

    def prepare_weights(self, content: Content) -> None:
        """De-rotated storage: ``content``'s softmax weights for the anchor set of every agent
        whose template has its placeholder, computed now (when the content is captured, or when
        its anchors change after a dense run) so that a plan only looks them up: the work leaves
        the consumer's time to first token. A set computed here that no request uses is dropped
        like any other (``MAX_WEIGHT_SETS``)."""
        if not self.config.derotated_storage:
            return
        pool = self.anchors.pool(content.placeholder)
        for agent, template in self.templates.items():
            if content.placeholder in template.placeholders:
                anchors = pool.compatible(content.kv.length, agent)
                if anchors:
                    self._weights(content, anchors)

    def _match(self, content: Content, anchors: list) -> None:
        """Distances of ``content`` to ``anchors`` (one batched call), kept on the content."""
        if self.matcher is not None and self.config.distance_dtype == "float32":
            found = self.matcher(content.kv, [a.emb for a in anchors])
        else:
            found = reference_match(content.kv, [a.emb for a in anchors], self.config.distance_dtype)
        for anchor, match in zip(anchors, Match.batch(*found)):
            old = content.matches.get(anchor.key)
            content.matches[anchor.key] = match
            content.cache_nbytes += match.nbytes - (old.nbytes if old is not None else 0)
        self.cache.update(content)

    def _weights(self, content: Content, anchors: list) -> AnchorWeights:
        """The content's softmax weights for this anchor set (cached per anchor set)."""
        keys = tuple(a.key for a in anchors)
        if keys not in content.weights:
            missing = [a for a in anchors if a.key not in content.matches]
            if missing:
                self._match(content, missing)
            weights = set_weights([content.matches[key] for key in keys], content.kv.length,
                                  self.config.temperature)
            content.weights[keys] = weights
            content.cache_nbytes += _nbytes(weights.packed)
            while len(content.weights) > MAX_WEIGHT_SETS:
                content.cache_nbytes -= _nbytes(content.weights.pop(next(iter(content.weights)))
                                                .packed)
        weights = content.weights[keys]
        self.cache.update(content)
        return weights

    def register_response(self, placeholder: str, generated_ids, k: torch.Tensor,
                          v: torch.Tensor, prompt_length: int) -> Content:
        """A produced message (spec §2.4): G generated ids, KV (L, G-1, H, D) of the fed-back ones
        at positions P..P+G-2. Its content is ids[:-1]; official storage re-bases keys by -P."""
        n = k.shape[1]
        if n != len(generated_ids) - 1:
            raise ValueError(f"{len(generated_ids)} generated ids need KV for {len(generated_ids) - 1}"
                             f" tokens, got {n}")
        positions = torch.arange(prompt_length, prompt_length + n)
        if not self.config.derotated_storage:
            k, positions = rotate(k, torch.full((n,), -prompt_length), self.rope), torch.arange(n)
        return self.register_content(placeholder, list(generated_ids)[:-1], k, v, positions)

    def layout(self, agent: str, content_keys: dict[str, str]) -> PromptLayout:
        template = self._template(agent)
        ids = {ph: self._content(key).token_ids for ph, key in content_keys.items()}
        return PromptLayout.assemble(template.piece_ids, template.placeholders, ids)

    # ---- planning ----
    def plan(self, agent: str, content_keys: dict[str, str]) -> ReusePlan | Fallback:
        template, layout = self._template(agent), self.layout(agent, content_keys)
        learn, reason = [], None
        if any(not self._content(content_keys[ph]).token_ids for ph in template.placeholders):
            return Fallback("empty_content")
        for ph in template.placeholders:
            content = self._content(content_keys[ph])
            anchor = self.anchors.pool(ph).anchors.get(content.key)
            if content.gate.is_new_anchor and (anchor is None or agent not in anchor.deviations):
                learn.append(ph)
                reason = reason or f"new_anchor:{content.gate.reason}"
            elif not self.anchors.pool(ph).compatible(len(content.token_ids), agent):
                learn.append(ph)
                reason = reason or "no_anchor_for_consumer"
        if reason:
            return Fallback(reason, learn)
        pieces = []
        for piece in layout.pieces[1:]:
            if piece.kind == "content":
                pieces.append(self._plan_content(agent, piece, content_keys[piece.placeholder]))
            else:
                content = self._content(content_keys[piece.placeholder])
                pieces.append(self._plan_template(agent, piece, template, content, pieces[-1]))
        return ReusePlan(agent, layout, pieces)

    def _plan_content(self, agent, piece, key) -> PiecePlan:
        content = self._content(key)
        anchors = self.anchors.pool(piece.placeholder).compatible(piece.length, agent)
        if self.config.derotated_storage:
            w = self._weights(content, anchors)
            return PiecePlan("content", piece.placeholder, content.kv, piece.start, anchors,
                             w.token_k, w.token_v, w.packed)
        base_k, base_v = self._matching_view(content.kv, piece.start)
        embs_k = torch.stack([a.emb.k[:, : piece.length] for a in anchors])
        embs_v = torch.stack([a.emb.v[:, : piece.length] for a in anchors])
        cfg = self.config
        wk = softmax_weights(placeholder_distances(base_k, embs_k, cfg.distance_dtype), cfg.temperature)
        wv = softmax_weights(placeholder_distances(base_v, embs_v, cfg.distance_dtype), cfg.temperature)
        return PiecePlan("content", piece.placeholder, content.kv, piece.start, anchors, wk, wv)

    def _plan_template(self, agent, piece, template, content, content_plan) -> PiecePlan:
        if self.config.derotated_storage:
            w = self._weights(content, content_plan.anchors)
            return PiecePlan("template", piece.placeholder, template.pieces[piece.index],
                             piece.start, content_plan.anchors, w.channel_k, w.channel_v, w.packed)
        t = content.kv.length
        base_k, base_v = self._matching_view(content.kv, content_plan.start)
        tails_k = torch.stack([a.emb.k[:, a.length - t:] for a in content_plan.anchors])
        tails_v = torch.stack([a.emb.v[:, a.length - t:] for a in content_plan.anchors])
        cfg = self.config
        wk = softmax_weights(prefix_distances(base_k, tails_k, cfg.distance_dtype), cfg.temperature)
        wv = softmax_weights(prefix_distances(base_v, tails_v, cfg.distance_dtype), cfg.temperature)
        return PiecePlan("template", piece.placeholder, template.pieces[piece.index], piece.start,
                         content_plan.anchors, wk, wv)

    def _matching_view(self, kv: StoredKV, start: int):
        """Keys compared with anchor embeddings: de-rotated, or rotated into this prompt (official)."""
        if self.config.derotated_storage:
            return kv.k, kv.v
        return kv.keys_at(torch.arange(start, start + kv.length), self.rope), kv.v

    # ---- assembly (torch) and learning ----
    def assemble(self, agent: str, content_keys: dict[str, str],
                 plan: ReusePlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """KV (L, N, H, D) of the whole prompt: x0 as stored, then every piece re-rotated and,
        with a plan, corrected (layers >= first_corrected_layer)."""
        template = self._template(agent)
        layout = plan.layout if plan else self.layout(agent, content_keys)
        x0 = template.pieces[0]
        ks, vs = [x0.keys_at(torch.arange(x0.length), self.rope)], [x0.v]
        for i, piece in enumerate(layout.pieces[1:]):
            source = (self._content(content_keys[piece.placeholder]).kv if piece.kind == "content"
                      else template.pieces[piece.index])
            k, v = self._place(source, piece.start, plan.pieces[i] if plan else None, agent)
            ks.append(k)
            vs.append(v)
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def _place(self, source: StoredKV, start: int, piece: PiecePlan | None, agent: str):
        n = source.length
        dst = torch.arange(start, start + n)
        if piece is None or not piece.anchors:
            return source.keys_at(dst, self.rope), source.v
        dk, dv = self._offset(piece, agent, n)
        l0 = self.config.first_corrected_layer
        dk[:l0], dv[:l0] = 0, 0
        if self.config.derotated_storage:
            k = rotate(source.k.to(torch.float32) + dk, dst, self.rope)
        else:
            k = source.keys_at(dst, self.rope).to(torch.float32) + dk
        return k.to(source.k.dtype), (source.v.to(torch.float32) + dv).to(source.v.dtype)

    def _offset(self, piece: PiecePlan, agent: str, n: int):
        devs = [a.deviations[agent] for a in piece.anchors]
        if piece.kind == "content":
            dk = torch.stack([d.content.k[:, :n] for d in devs])
            dv = torch.stack([d.content.v[:, :n] for d in devs])
            wk, wv = piece.weights_k[:, None, :, None, None], piece.weights_v[:, None, :, None, None]
        else:
            dk = torch.stack([d.template.k for d in devs])
            dv = torch.stack([d.template.v for d in devs])
            wk, wv = piece.weights_k[:, :, None], piece.weights_v[:, :, None]
        return (wk * dk.to(torch.float32)).sum(0), (wv * dv.to(torch.float32)).sum(0)

    def record(self, agent: str, content_keys: dict[str, str], learn: list[str],
               real_k: torch.Tensor, real_v: torch.Tensor) -> list[tuple[str, str]]:
        """After a dense prefill: add ``agent``'s deviations for the ``learn`` placeholders (spec §3).
        real_k, real_v (L, N, H, D) cover the whole prompt. Returns evicted (placeholder, key)."""
        template, layout = self._template(agent), self.layout(agent, content_keys)
        if real_k.shape[1] != layout.total_length:
            raise ValueError(f"real KV has {real_k.shape[1]} tokens, the prompt "
                             f"{layout.total_length}")
        evicted = []
        for piece in layout.content_pieces():
            if piece.placeholder not in learn:
                continue
            content = self._content(content_keys[piece.placeholder])
            after = layout.template_piece(piece.index)
            dev_content, emb = self._deviation(content.kv, piece.start, real_k, real_v)
            dev_template, _ = self._deviation(template.pieces[after.index], after.start, real_k,
                                              real_v)
            pool = self.anchors.pool(piece.placeholder)
            evicted += [(piece.placeholder, k) for k in pool.add(
                content.key, emb, agent, Deviation(dev_content, dev_template))]
        evicted += self.anchors.enforce_budget()
        changed = set(learn) | {ph for ph, _ in evicted}
        for content in list(self.contents.values()):
            if content.placeholder in changed:
                self.prepare_weights(content)
        return evicted

    def _deviation(self, source: StoredKV, start: int, real_k, real_v):
        """-> (deviation block real - base, the anchor embedding block of ``source``)."""
        n = source.length
        dst = torch.arange(start, start + n)
        rk, rv = real_k[:, start:start + n], real_v[:, start:start + n]
        base_k, base_v = source.k, source.v
        if self.config.derotated_storage:   # de-rotated: the embedding is the stored base itself
            dev = self.make_kv(rotate(rk, -dst, self.rope) - base_k, rv - base_v,
                               torch.zeros_like(dst))
            return dev, source
        base_k = source.keys_at(dst, self.rope)
        return self.make_kv(rk - base_k, rv - base_v, dst), self.make_kv(base_k, base_v, dst)

    def forget_consumer(self, agent: str) -> None:
        """``agent``'s template changed: the deviations learned under the old one no longer
        describe its prompts; its anchors learn again from its next dense prefills."""
        for pool in self.anchors.pools.values():
            for anchor in pool.anchors.values():
                anchor.deviations.pop(agent, None)

    def release_caches(self) -> None:
        """Give every content's distances and weights back to the shared budget (the namespace
        is going away)."""
        for content in self.contents.values():
            self.cache.forget(content)
            content.matches, content.weights, content.cache_nbytes = {}, {}, 0

    def drop_content(self, key: str) -> Content | None:
        """Forget a content (its base KV was evicted); plans that need it fall back."""
        content = self.contents.pop(key, None)
        if content is not None:
            self.cache.forget(content)
        return content

    def _template(self, agent: str) -> AgentTemplate:
        if agent not in self.templates:
            raise ValueError(f"agent {agent!r} has no registered template")
        return self.templates[agent]

    def _content(self, key: str) -> Content:
        if key not in self.contents:
            raise ValueError(f"unknown content segment {key!r}")
        return self.contents[key]
