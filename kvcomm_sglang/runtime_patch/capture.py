"""What a finished KVCOMM request leaves behind: its agent's template, its message's base KV,
the anchors its dense prefill observed, and its output as a message (DESIGN §3 step 4).

Runs in ``cache_finished_req`` before SGLang frees the request's slots, inside the namespace's
``building`` scope: blocks made here and not attached to the namespace's state (a capture that
failed half-way, a replaced template) are freed by the sweep that follows.
"""

from __future__ import annotations

import torch


def capture(runtime, ns, hints, decision, req, kv_len: int) -> None:
    ids, n = list(req.origin_input_ids), len(req.origin_input_ids)
    if hints.template or hints.base or decision.learn:
        k, v = runtime.gather(req, 0, n)
        if hints.template:
            register_template(ns, hints, ids, k, v)
        if hints.base:
            message, placeholder, drop = hints.base
            content = ns.state.register_content(placeholder, ids[drop:], k[:, drop:],
                                                v[:, drop:], torch.arange(drop, n))
            ns.bind(message, content.key)
        if decision.learn and all(key in ns.state.contents for key in decision.keys.values()) \
                and decision.agent in ns.state.templates:
            ns.state.record(hints.agent, decision.keys, decision.learn, k, v)
            ns.version += 1
    if hints.capture:
        capture_output(runtime, ns, hints, req, n, kv_len)


def register_template(ns, hints, ids, k, v) -> None:
    """The template pass: its pieces' KV. A re-registered template with other pieces makes the
    anchors learned under the old one meaningless: they are dropped with it."""
    spans, piece_ids, names, pos = [], [], [], 0
    for piece in hints.layout:
        if piece.kind == "template":
            spans.append((pos, pos + piece.length))
            piece_ids.append(tuple(ids[pos:pos + piece.length]))
        else:
            names.append(piece.placeholder)
        pos += piece.length
    old = ns.state.templates.get(hints.agent)
    ns.state.register_template(hints.agent, piece_ids, names, k, v, spans)
    if old is not None and (old.piece_ids != piece_ids or old.placeholders != names):
        ns.state.forget_consumer(hints.agent)
    ns.version += 1


def capture_output(runtime, ns, hints, req, n: int, kv_len: int) -> None:
    out = list(req.output_ids)
    if len(out) < 2 or kv_len < n + len(out) - 1:
        runtime.count_fallback("capture_too_short")
        return
    k, v = runtime.gather(req, n, n + len(out) - 1)
    message, placeholder = hints.capture
    content = ns.state.register_response(placeholder, out, k, v, n)
    ns.bind(message, content.key)
