"""ReusePlan for one consumer call, or a Fallback with its reason (spec §5.2, §2.5, §4, §3).

``KVCommState`` holds, for one workflow namespace, the shared contents' base KV; the agents'
template KV and the anchor pools are its application's (``application.ApplicationState``).
Stored KV keeps the positions of its frame: all zeros when de-rotated (DESIGN §4), the
positions where it was computed in the official (absolute) mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcomm_sglang.anchors import Deviation
from kvcomm_sglang.application import AgentTemplate, ApplicationState
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.estimator import (GateResult, entropy_gate, gate_from_distances,
                                     placeholder_distances, prefix_distances, softmax_weights)
from kvcomm_sglang.kvblock import StoredKV
from kvcomm_sglang.matching import (MAX_WEIGHT_SETS, AnchorWeights, Match, MatchCache,  # noqa: F401
                                    _nbytes, reference_match, set_weights, unpack)
from kvcomm_sglang.rope import RopeSpec, rotate
from kvcomm_sglang.segments import PromptLayout, segment_key


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


class KVCommState:
    """One workflow: its messages' base KV (``contents``) and its plans. The templates and the
    anchor pools are its application's (``app``), shared with the application's other
    workflows; a state made without one has an application of its own."""

    def __init__(self, config: KVCommConfig, rope: RopeSpec, namespace: str = "",
                 make_kv=StoredKV, on_evict=None, matcher=None, cache: MatchCache | None = None,
                 app: ApplicationState | None = None):
        """``make_kv(k, v, positions)`` builds the workflow's stored blocks (default: plain
        tensors); ``on_evict(anchor)`` is told of every anchor the pools drop (own application
        only); ``matcher(kv, embs)`` returns ``reference_match``'s five tensors (default:
        ``reference_match``); ``cache`` bounds the contents' distances and weights (default:
        this state's own, ``match_cache_bytes``)."""
        self.config, self.rope, self.namespace = config, rope, namespace
        self.make_kv = make_kv
        self.matcher = matcher
        self.cache = cache if cache is not None else MatchCache(config.match_cache_bytes)
        self.app = app if app is not None else ApplicationState(config, rope, namespace, make_kv,
                                                                on_evict)
        self.app.workflows.add(self)
        self.contents: dict[str, Content] = {}

    @property
    def templates(self) -> dict[str, AgentTemplate]:
        return self.app.templates

    @property
    def anchors(self):
        return self.app.anchors

    def anchor_evicted(self, anchor) -> None:
        """The application dropped ``anchor``: forget the contents' distances to it."""
        for content in self.contents.values():
            match = content.matches.pop(anchor.key, None)
            if match is not None:
                gone = [k for k in content.weights if anchor.key in k]
                content.cache_nbytes -= match.nbytes + sum(
                    _nbytes(content.weights.pop(k).packed) for k in gone)
                self.cache.update(content, used=False)

    # ---- storage ----
    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> StoredKV:
        """KV computed at ``positions`` -> stored form (de-rotated, or as is when faithful)."""
        if self.config.derotated_storage:
            return self.make_kv(rotate(k, -positions, self.rope), v, torch.zeros_like(positions))
        return self.make_kv(k, v, positions)

    def register_template(self, agent: str, piece_ids, placeholders, k: torch.Tensor,
                          v: torch.Tensor, piece_spans) -> AgentTemplate:
        return self.app.register_template(agent, piece_ids, placeholders, k, v, piece_spans)

    def content_key(self, placeholder: str, token_ids) -> str:
        """The key of a content: its tokens under its placeholder, in this application."""
        return segment_key(token_ids, self.app.key + "|" + placeholder)

    def register_content(self, placeholder: str, token_ids, k: torch.Tensor, v: torch.Tensor,
                         positions: torch.Tensor) -> Content:
        """A new shared segment: store its base KV and predict whether anchors can vouch for it."""
        if len(token_ids) != k.shape[1]:
            raise ValueError(f"{len(token_ids)} content ids but {k.shape[1]} KV tokens")
        key = self.content_key(placeholder, token_ids)
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
        if self.config.position_only:         # the baseline: every piece re-rotated, uncorrected
            return ReusePlan(agent, layout, [PiecePlan(p.kind, p.placeholder, self._source(
                template, p, content_keys), p.start) for p in layout.pieces[1:]])
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

    def _source(self, template: AgentTemplate, piece, content_keys) -> StoredKV:
        if piece.kind == "content":
            return self._content(content_keys[piece.placeholder]).kv
        return template.pieces[piece.index]

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
            evicted += [(piece.placeholder, k) for k in self.app.add_anchor(
                piece.placeholder, content.key, content.kv, agent,
                Deviation(dev_content, dev_template), emb)]
        evicted += self.anchors.enforce_budget()
        changed = set(learn) | {ph for ph, _ in evicted}
        for content in list(self.contents.values()):
            if content.placeholder in changed:
                self.prepare_weights(content)
        return evicted

    def _deviation(self, source: StoredKV, start: int, real_k, real_v):
        """-> (deviation block real - base, the official frame's anchor embedding block of
        ``source`` or None: de-rotated, the embedding is the stored base itself), both made in
        the application's blocks."""
        n, make = source.length, self.app.make_kv
        dst = torch.arange(start, start + n)
        rk, rv = real_k[:, start:start + n], real_v[:, start:start + n]
        base_k, base_v = source.k, source.v
        if self.config.derotated_storage:
            return make(rotate(rk, -dst, self.rope) - base_k, rv - base_v,
                        torch.zeros_like(dst)), None
        base_k = source.keys_at(dst, self.rope)
        return make(rk - base_k, rv - base_v, dst), make(base_k, base_v, dst)

    def release_caches(self) -> None:
        """Give every content's distances and weights back to the shared budget (the workflow
        is going away; its application no longer tells it of evicted anchors)."""
        self.app.workflows.discard(self)
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
