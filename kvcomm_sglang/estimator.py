"""Offset estimation and sharability prediction (paper §4, spec §4.2–§4.3 and §5.1).

All functions are batched over anchors: no Python loop over layers or anchors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ENTROPY_EPS = 1e-40


def _diff(a: torch.Tensor, b: torch.Tensor, dtype: str) -> torch.Tensor:
    """a - b in fp32 ('float32') or in the cache dtype ('cache', the official behaviour)."""
    if dtype == "cache":
        return a.to(b.dtype) - b
    return a.to(torch.float32) - b.to(torch.float32)


def placeholder_distances(base: torch.Tensor, anchor_embs: torch.Tensor,
                          dtype: str = "float32") -> torch.Tensor:
    """Head-aligned per-token mean |diff| over (L, H, D) (spec §4.2 b).

    base (L, T, H, D), anchor_embs (A, L, >=T, H, D) -> (A, T) fp32.
    """
    t = base.shape[1]
    diff = _diff(base.unsqueeze(0), anchor_embs[:, :, :t], dtype).abs()
    return diff.mean(dim=(1, 3, 4)).to(torch.float32)


def prefix_distances(base: torch.Tensor, anchor_embs_tail: torch.Tensor,
                     dtype: str = "float32") -> torch.Tensor:
    """Tail-aligned per-(layer, head, channel) L2 over tokens (spec §4.2 a).

    base (L, T, H, D), anchor_embs_tail (A, L, T, H, D) (each anchor's last T tokens)
    -> (A, L, H, D) fp32.
    """
    diff = _diff(base.unsqueeze(0), anchor_embs_tail, dtype)
    return torch.linalg.vector_norm(diff, dim=2).to(torch.float32)


def gate_distances(candidate_v: torch.Tensor, anchor_heads_v: torch.Tensor,
                   dtype: str = "float32") -> torch.Tensor:
    """Frobenius distance of the gate (spec §5.1): candidate_v (L, T, H, D), anchor_heads_v
    (A, L, T, H, D) (each anchor's first T tokens) -> (A,) fp32."""
    diff = _diff(candidate_v.unsqueeze(0), anchor_heads_v, dtype)
    return torch.linalg.vector_norm(diff.flatten(1), dim=1).to(torch.float32)


def softmax_weights(distances: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax over the anchor axis (dim 0) of -distance / tau, in fp32."""
    return torch.softmax(distances.to(torch.float32) * (-1.0 / temperature), dim=0)


def estimate_offset(deviations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_a w_a * delta_a (spec §4.3).

    deviations (A, L, N, H, D); weights broadcastable to it, e.g. (A, 1, N, 1, 1) for
    per-token weights or (A, L, 1, H, D) for per-channel weights -> (L, N, H, D) fp32.
    """
    if deviations.shape[0] != weights.shape[0]:
        raise ValueError(f"{deviations.shape[0]} anchor deviations but {weights.shape[0]} weights")
    return (weights.to(torch.float32) * deviations.to(torch.float32)).sum(dim=0)


@dataclass(frozen=True)
class GateResult:
    """Outcome of predict-as-anchor for one new shared segment (spec §5.1)."""

    is_new_anchor: bool
    reason: str                       # "reusable" | "too_few_anchors" | "ambiguous"
    entropy: float = float("nan")     # normalized to [0, 1] by log2(#available)
    probs: tuple[float, ...] = ()
    available: tuple[int, ...] = ()   # indices (into the given anchors) that passed the length filter
    credited: tuple[int, ...] = ()    # indices whose activation count goes up


def entropy_gate(candidate_v: torch.Tensor, anchor_vs: list[torch.Tensor], gamma: float,
                 top_p: float = 0.9, credit: str = "nucleus", min_anchors: int = 2,
                 temperature: float = 1.0, dtype: str = "float32") -> GateResult:
    """Is the new segment reusable, judged on values only against its placeholder's pool?

    candidate_v (L, T, H, D); anchor_vs: A tensors (L, l_a, H, D). New anchor when fewer than
    ``min_anchors`` anchors are at least T long, or when the normalized entropy of
    softmax(-||V - V_a[:T]||_F / tau) exceeds gamma.
    """
    t = candidate_v.shape[1]
    available = tuple(i for i, a in enumerate(anchor_vs) if a.shape[1] >= t)
    if len(anchor_vs) < min_anchors or len(available) < min_anchors:
        return gate_from_distances(None, len(anchor_vs), available, gamma, top_p, credit,
                                   min_anchors, temperature)
    stacked = torch.stack([anchor_vs[i][:, :t] for i in available])
    return gate_from_distances(gate_distances(candidate_v, stacked, dtype), len(anchor_vs), available, gamma, top_p, credit,
                               min_anchors, temperature)


def gate_from_distances(dist: torch.Tensor | None, num_anchors: int, available: tuple[int, ...],
                        gamma: float, top_p: float = 0.9, credit: str = "nucleus",
                        min_anchors: int = 2, temperature: float = 1.0) -> GateResult:
    """The gate's decision from the Frobenius V distances ``dist`` (one per ``available`` anchor,
    those at least T long, out of ``num_anchors``); ``entropy_gate`` computes them itself."""
    if num_anchors < min_anchors or len(available) < min_anchors:
        return GateResult(True, "too_few_anchors",
                          available=available if num_anchors >= min_anchors else ())
    probs = torch.softmax(-dist.to(torch.float32) / temperature, dim=0).double().cpu()
    entropy = float(-(probs * torch.log2(probs + ENTROPY_EPS)).sum()) / math.log2(len(available))
    entropy = min(entropy, 1.0)       # rounding of near-uniform probs must not beat gamma >= 1
    plist = tuple(float(p) for p in probs)
    if entropy > gamma:
        return GateResult(True, "ambiguous", entropy, plist, available)
    picked = top_p_indices(probs, top_p, credit)
    return GateResult(False, "reusable", entropy, plist, available,
                      tuple(available[i] for i in picked))


def top_p_indices(probs: torch.Tensor, top_p: float, credit: str = "nucleus") -> list[int]:
    """Anchors credited after a confident prediction.

    'nucleus': the smallest most-probable set whose mass reaches top_p (crossing element in).
    'official' [QUIRK]: elements strictly below top_p cumulative mass; when none is (the best
    anchor alone has p >= top_p), every available anchor is credited.
    """
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    cum = torch.cumsum(probs[order], dim=0).tolist()
    if credit == "nucleus":
        cut = next((j for j, c in enumerate(cum) if c >= top_p - 1e-12), len(order) - 1)
    elif credit == "official":
        below = [j for j, c in enumerate(cum) if c < top_p]
        cut = max(below) if below else len(order) - 1
    else:
        raise ValueError(f"unknown top-p credit mode {credit!r}")
    return order[: cut + 1]
