"""An application's learned state as plain CPU tensors and back: what ``--kvcomm-anchor-path``
saves and loads (docs/isolation.md, "Across restarts").

``snapshot`` copies every template (its key, piece ids, placeholders, piece KV) and every anchor
(pool order, activations, embedding, each consumer template's deviations) out of stored blocks;
``restore`` writes them back through the application's block factory. A template whose ids do
not hash to its saved key (``template_key``, also the name a server stores it under) is
refused, and with it every deviation learned under it.
"""

from __future__ import annotations

import torch

from kvcomm_sglang.anchors import Anchor, Deviation
from kvcomm_sglang.application import AgentTemplate, ApplicationState, template_key

FORMAT = 2      # 2: a question's base KV (an anchor's embedding) is the KV of the first call
                # that computed it, no longer a prefill after a neutral header (38f103b); pools
                # of format 1 would mix both kinds of embedding, so they are refused


def _block(kv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kv.k.detach().cpu(), kv.v.detach().cpu(), kv.positions.detach().cpu()


def snapshot(app: ApplicationState) -> dict:
    templates = [{"key": key, "hash": t.key, "piece_ids": [list(p) for p in t.piece_ids],
                  "placeholders": list(t.placeholders), "pieces": [_block(p) for p in t.pieces]}
                 for key, t in app.templates.items()]
    pools = {}
    for name, pool in app.anchors.pools.items():
        pools[name] = [{"key": a.key, "activations": a.activations, "emb": _block(a.emb),
                        "deviations": {consumer: (_block(d.content), _block(d.template))
                                       for consumer, d in a.deviations.items()}}
                       for a in pool.anchors.values()]
    return {"format": FORMAT, "templates": templates, "pools": pools}


def restore(app: ApplicationState, data: dict) -> list[str]:
    """Write ``data`` (a ``snapshot``) into ``app``; -> what was refused, one line each. The
    application's block factory may raise (a full store): what was restored until then stays
    consistent (an anchor is added whole or not at all)."""
    if data.get("format") != FORMAT:
        return [f"snapshot format {data.get('format')!r}, this server reads {FORMAT}"]
    refused, known = [], set()
    for entry in data["templates"]:
        ids = [tuple(int(t) for t in p) for p in entry["piece_ids"]]
        if template_key(ids, entry["placeholders"]) != entry["hash"]:
            refused.append(f"template {entry['key']}: its tokens hash to "
                           f"{template_key(ids, entry['placeholders'])}, not to its key "
                           f"{entry['hash']}")
            continue
        pieces = [app.make_kv(*block) for block in entry["pieces"]]
        app.templates[entry["key"]] = AgentTemplate(entry["key"], ids,
                                                    list(entry["placeholders"]), pieces)
        known.add(entry["key"])
    for name, anchors in data["pools"].items():
        pool = app.anchors.pool(name)
        for entry in anchors:
            deviations = {c: (content, template) for c, (content, template)
                          in entry["deviations"].items() if c in known}
            if not deviations or entry["key"] in pool or len(pool) >= app.config.pool_capacity:
                continue
            anchor = Anchor(entry["key"], app.make_kv(*entry["emb"]),
                            activations=int(entry["activations"]))
            for consumer, (content, template) in deviations.items():
                anchor.deviations[consumer] = Deviation(app.make_kv(*content),
                                                        app.make_kv(*template))
            pool.anchors[anchor.key] = anchor
    app.anchors.enforce_budget()
    return refused
