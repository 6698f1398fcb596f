"""Torch reference of materialize (the ground truth for every kernel) and of capture.

See ``kernels/plan.py`` for the formula. Computes in fp32 and casts to the pool dtype once.
"""

from __future__ import annotations

import torch

from kvcomm_sglang.kernels.plan import MaterializePlan, check_plan
from kvcomm_sglang.rope import apply_cos_sin


def materialize_reference(plan: MaterializePlan, pool, cos_sin: torch.Tensor) -> None:
    check_plan(plan, pool, cos_sin)
    if plan.num_tokens == 0:
        return
    rotary_dim = cos_sin.shape[1]
    half = rotary_dim // 2
    table = cos_sin[plan.positions]
    cos, sin = table[:, None, :half], table[:, None, half:]
    has_dev = plan.dev_slots >= 0                                        # (N, A)
    dev = plan.dev_slots.clamp(min=0)
    for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        k = kb[plan.src_slots].to(torch.float32)                          # (N, H, D)
        v = vb[plan.src_slots].to(torch.float32)
        if plan.num_anchors and layer >= plan.first_corrected_layer:
            wk, wv = _weights(plan, layer, has_dev)                       # (N, A, H|1, D|1)
            k = k + (wk * kb[dev].to(torch.float32)).sum(dim=1)
            v = v + (wv * vb[dev].to(torch.float32)).sum(dim=1)
        kb[plan.dst_slots] = apply_cos_sin(k, cos, sin, rotary_dim, plan.is_neox).to(kb.dtype)
        vb[plan.dst_slots] = v.to(vb.dtype)


def _weights(plan: MaterializePlan, layer: int, has_dev: torch.Tensor):
    n, a = plan.dev_slots.shape
    heads, dim = plan.channel_wk.shape[-2:] if plan.channel_wk.shape[0] else (1, 1)
    out = []
    for token_w, channel_w in ((plan.token_wk, plan.channel_wk), (plan.token_wv, plan.channel_wv)):
        w = token_w[:, :, None, None].expand(n, a, heads, dim).clone()
        templ = plan.group >= 0
        if templ.any():
            w[templ] = channel_w[plan.group[templ], :, layer]
        out.append(w * has_dev[:, :, None, None])
    return out


def capture_reference(pool, src_slots: torch.Tensor, positions: torch.Tensor,
                      dst_slots: torch.Tensor, cos_sin: torch.Tensor, is_neox: bool = True) -> None:
    """Copy KV from ``src_slots`` (cached at ``positions``) to ``dst_slots`` de-rotated:
    K[dst] = R(-pos) K[src], V[dst] = V[src], all layers."""
    n = src_slots.shape[0]
    if positions.shape != (n,) or dst_slots.shape != (n,):
        raise ValueError(f"capture needs src_slots, positions, dst_slots of one length; got "
                         f"{n}, {tuple(positions.shape)}, {tuple(dst_slots.shape)}")
    if n and int(positions.max()) >= cos_sin.shape[0]:
        raise ValueError(f"position {int(positions.max())} is beyond the cos/sin table "
                         f"({cos_sin.shape[0]} rows)")
    rotary_dim = cos_sin.shape[1]
    table = cos_sin[positions]
    cos, sin = table[:, None, : rotary_dim // 2], -table[:, None, rotary_dim // 2:]
    for kb, vb in zip(pool.k_buffer, pool.v_buffer):
        kb[dst_slots] = apply_cos_sin(kb[src_slots], cos, sin, rotary_dim, is_neox)
        vb[dst_slots] = vb[src_slots]
