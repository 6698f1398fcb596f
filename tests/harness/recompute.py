"""Recomputing chosen prompt tokens over an assembled (approximate) KV, in the oracle only.

``refresh`` gives the chosen tokens the KV a prefill computes when it attends to the assembled
KV of the tokens before them (CacheBlend's selective recompute; for the first tokens of every
reused segment, EPIC's attention-sink fix). Runs of consecutive chosen tokens are prefilled in
prompt order, each behind the KV assembled so far (earlier chosen tokens already recomputed),
so the result is what one masked forward pass over the chosen tokens would give.

SGLang's prefix-cache path extends only a suffix of the prompt; a token in the middle of it
cannot be recomputed there without a custom attention mask, so these are oracle-only options.
"""

from __future__ import annotations

import torch


def refresh(hf, ids: list[int], k: torch.Tensor, v: torch.Tensor, positions) -> tuple:
    """k, v (L, N, H, D) with the tokens at ``positions`` recomputed (new tensors)."""
    k, v = k.clone(), v.clone()
    for start, end in runs(sorted(set(int(p) for p in positions))):
        head = hf.prefill(ids[start:end], (k[:, :start], v[:, :start]), start)
        k[:, start:end], v[:, start:end] = head.k.to(k.dtype), head.v.to(v.dtype)
    return k, v


def runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct positions -> maximal [start, end) runs of consecutive ones."""
    out = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def sink_positions(layout, tokens: int, end: int) -> list[int]:
    """The first ``tokens`` positions of every piece after x0, below ``end``."""
    return [p for piece in layout.pieces[1:]
            for p in range(piece.start, min(piece.start + tokens, piece.end, end))]


def largest_offsets(corrected: tuple, plain: tuple, start: int, end: int, count: int) -> list:
    """The ``count`` positions in [start, end) where the anchors' estimated offset (corrected
    minus re-rotated-only KV, K and V, layers >= 1) has the largest norm."""
    diff = [(c[1:, start:end] - p[1:, start:end]).double() for c, p in zip(corrected, plain)]
    norms = sum(d.pow(2).sum(dim=(0, 2, 3)) for d in diff)
    top = torch.topk(norms, min(count, end - start)).indices
    return sorted(start + int(i) for i in top)
