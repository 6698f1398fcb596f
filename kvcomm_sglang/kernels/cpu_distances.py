"""Distances of a content to its anchors on the CPU: ``matching.reference_match``'s five tensors
(spec §4.2, §5.1) without its stacked (A, L, T, H, D) copies.

The reference gathers every anchor embedding twice per tensor (head- and tail-aligned), stacks
them, and takes one fp32 difference per alignment. Here each anchor's K and V are read once,
its difference to the content is taken once per alignment (once in all when the anchor is as
long as the content: both alignments are the same tokens), and reduced at once into the
per-token mean |diff| (ph), the per-channel L2 over tokens (pf) and the gate's Frobenius
distance of V; anchor by anchor, so memory stays one (L, T, H, D) difference. fp32 throughout
(``distance_dtype="float32"``); tested against the reference on random inputs
(``tests/kernels/test_cpu_distances.py``).
"""

from __future__ import annotations

import torch


def cpu_anchor_distances(kv, embs: list):
    """kv (T tokens; ``.k``/``.v`` (L, T, H, D)), embs (each ``.length`` >= T) ->
    ph_k, ph_v (A, T), pf_k, pf_v (A, L, H, D), gate_v (A,), all fp32."""
    t = kv.length
    k, v = kv.k.to(torch.float32), kv.v.to(torch.float32)
    rows = [_one(k, v, emb, t) for emb in embs]
    if not rows:
        layers, _, heads, dim = k.shape
        return (torch.zeros(0, t), torch.zeros(0, t), torch.zeros(0, layers, heads, dim),
                torch.zeros(0, layers, heads, dim), torch.zeros(0))
    return tuple(torch.stack(column) for column in zip(*rows))


def _one(k: torch.Tensor, v: torch.Tensor, emb, t: int):
    ek, ev, n = emb.k, emb.v, emb.length
    head_k, head_v = k - ek[:, :t], v - ev[:, :t]                 # (L, T, H, D) fp32
    tail_k = head_k if n == t else k - ek[:, n - t:]
    tail_v = head_v if n == t else v - ev[:, n - t:]
    return (head_k.abs().mean(dim=(0, 2, 3)), head_v.abs().mean(dim=(0, 2, 3)),
            torch.linalg.vector_norm(tail_k, dim=1), torch.linalg.vector_norm(tail_v, dim=1),
            torch.linalg.vector_norm(head_v))
