"""What a finished KVCOMM request leaves behind: its agent's template and the anchors its dense
prefill observed (its application's), its message's base KV and its output as a message (its
workflow's) (DESIGN §3 step 4).

A message's base KV comes from where it is first computed: the output of the request that
generated it, a base request's message, or, for a message no request has computed yet (the
user's question in the first agent's prompt), the dense prefill of the first call that holds
it (``first_computed``), so a workflow sends no separate base request.

Runs in ``cache_finished_req`` before SGLang frees the request's slots, inside the namespace's
and the application's ``building`` scopes: blocks made here and not attached to their owner's
state (a capture that failed half-way) are freed by the sweeps that follow.
"""

from __future__ import annotations

import torch

from kvcomm_sglang import protocol
from kvcomm_sglang.application import template_key
from kvcomm_sglang.runtime_patch.segment_store import StoreFull


def capture(runtime, ns, hints, decision, req, kv_len: int) -> None:
    ids, n = list(req.origin_input_ids), len(req.origin_input_ids)
    template = new_template(ns, hints, ids) if hints.template else None
    if template or hints.base or decision.learn:
        k, v = runtime.gather(req, 0, n)
        if template:
            key, piece_ids, names, spans = template
            ns.app.state.register_template(key, piece_ids, names, k, v, spans)
            ns.app.version += 1
        if hints.base:
            message, placeholder, drop = hints.base
            content = ns.state.register_content(placeholder, ids[drop:], k[:, drop:],
                                                v[:, drop:], torch.arange(drop, n))
            ns.bind(message, content.key)
        if decision.learn and all(key in ns.state.contents for key in decision.keys.values()) \
                and decision.template in ns.app.state.templates:
            ns.state.record(decision.template, decision.keys, decision.learn, k, v)
            ns.app.version += 1
    store_first_computed(runtime, ns, first_computed(ns, hints, decision, n), ids, req)
    if hints.capture:
        capture_output(runtime, ns, hints, req, n, kv_len)


def store_first_computed(runtime, ns, pieces, ids, req) -> None:
    """Each piece's KV (gathered piece by piece) as its message's base; the same tokens under
    the same placeholder already stored (another message id) are bound, not stored again. A
    piece the store cannot hold is counted (``store_full``) and skipped: the rest of the
    capture, the call's own output included, goes on."""
    for message, placeholder, start, end in pieces:
        key = ns.state.content_key(placeholder, ids[start:end])
        if key in ns.state.contents:
            ns.bind(message, key)
            continue
        k, v = runtime.gather(req, start, end)
        try:
            content = ns.state.register_content(placeholder, ids[start:end], k, v,
                                                torch.arange(start, end))
        except StoreFull:
            runtime.count_fallback("store_full")
            continue
        ns.bind(message, content.key)


def first_computed(ns, hints, decision, num_ids: int) -> list[tuple[str, str, int, int]]:
    """(message, placeholder, start, end) of the content pieces of a dense call whose message
    the workflow does not hold: this prefill computed them first (exact KV: a dense request never
    reads approximate KV), so their KV becomes their base KV. Empty pieces are left out, and so
    is every piece of a layout that no longer spans the prompt (the scheduler may truncate it)."""
    if decision.kind != "dense" or hints.template or not hints.layout \
            or sum(p.length for p in hints.layout) != num_ids:
        return []
    found = []
    for piece, start, end in protocol.piece_spans(hints.layout):
        if piece.kind == "content" and end > start and not _held(ns, piece.message) \
                and piece.message not in {f[0] for f in found}:
            found.append((piece.message, piece.placeholder, start, end))
    return found


def _held(ns, message: str) -> bool:
    key = ns.messages.get(message)
    return key is not None and key in ns.state.contents


def new_template(ns, hints, ids):
    """A template pass's (key, piece ids, placeholders, piece spans), or None when the
    application holds that template already (found by its tokens: a new workflow's pass adds
    nothing, and the deviations learned under it stay). An agent whose template changed is a
    new template, without deviations."""
    piece_ids, names = protocol.template_of(hints.layout, ids)
    spans = [(s, e) for p, s, e in protocol.piece_spans(hints.layout) if p.kind == "template"]
    key = template_key(piece_ids, names)
    return None if key in ns.app.state.templates else (key, piece_ids, names, spans)


def capture_output(runtime, ns, hints, req, n: int, kv_len: int) -> None:
    out = list(req.output_ids)
    if len(out) < 2 or kv_len < n + len(out) - 1:
        runtime.count_fallback("capture_too_short")
        return
    k, v = runtime.gather(req, n, n + len(out) - 1)
    message, placeholder = hints.capture
    content = ns.state.register_response(placeholder, out, k, v, n)
    ns.bind(message, content.key)
