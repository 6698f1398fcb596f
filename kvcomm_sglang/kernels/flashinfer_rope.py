"""FlashInfer-backed materialize: the same result as ``materialize_reference`` (formula in
``kernels/plan.py``; paper §4.3 offset application, §2.5 rotation), with the key rotation done by
FlashInfer's ``apply_rope_with_cos_sin_cache_inplace`` (SGLang's own RoPE kernel).

Per layer: gather base K/V, add the anchor-weighted deviations in fp32 (torch), scatter V with
``index_copy_`` and stage K in the pool dtype; then one FlashInfer call rotates the staged K of
all layers at once (layers folded into the head axis, since every layer of a token shares its
position), and ``index_copy_`` scatters K. FlashInfer's kernel takes fp16/bf16 only and rotates
the stored (rounded) sum, so this path rounds K twice where the reference rounds once. Selectable
as a backend and used as a cross-check of the Triton kernel.
"""

from __future__ import annotations

import torch

from kvcomm_sglang.kernels.plan import MaterializePlan, check_plan
from kvcomm_sglang.kernels.reference import _weights

POOL_DTYPES = (torch.float16, torch.bfloat16)


def materialize_flashinfer(plan: MaterializePlan, pool, cos_sin: torch.Tensor) -> None:
    """Run ``plan`` on ``pool`` (``k_buffer``/``v_buffer``: L x (slots, H, D)) in place."""
    check_plan(plan, pool, cos_sin)
    k0 = pool.k_buffer[0]
    if not k0.is_cuda:
        raise ValueError(f"the flashinfer backend needs a CUDA pool, got {k0.device}")
    if k0.dtype not in POOL_DTYPES:
        raise ValueError(f"FlashInfer RoPE supports fp16/bf16 pools only, got {k0.dtype}")
    rope = _import_rope()
    if plan.num_tokens == 0:
        return
    num_tokens, (_, heads, head_dim) = plan.num_tokens, k0.shape
    dst = plan.dst_slots.long()
    staged_k = torch.empty(num_tokens, len(pool.k_buffer), heads, head_dim, dtype=k0.dtype,
                           device=k0.device)
    has_dev, dev = plan.dev_slots >= 0, plan.dev_slots.clamp(min=0)
    for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        k = kb[plan.src_slots].to(torch.float32)                          # (N, H, D)
        v = vb[plan.src_slots].to(torch.float32)
        if plan.num_anchors and layer >= plan.first_corrected_layer:
            wk, wv = _weights(plan, layer, has_dev)                       # (N, A, H|1, D|1)
            k += (wk * kb[dev].to(torch.float32)).sum(dim=1)
            v += (wv * vb[dev].to(torch.float32)).sum(dim=1)
        staged_k[:, layer] = k
        vb.index_copy_(0, dst, v.to(vb.dtype))
    dummy_query = torch.zeros(num_tokens, head_dim, dtype=k0.dtype, device=k0.device)
    rope(plan.positions.contiguous(), dummy_query, staged_k.view(num_tokens, -1), head_dim,
         cos_sin.contiguous(), is_neox=bool(plan.is_neox))
    for layer, kb in enumerate(pool.k_buffer):
        kb.index_copy_(0, dst, staged_k[:, layer])


def _import_rope():
    try:
        from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace
    except ImportError as exc:
        raise ImportError("the flashinfer materialize backend needs flashinfer-python "
                          "(0.6.15.post1, the version SGLang 0.5.17 pins): pip install "
                          "flashinfer-python==0.6.15.post1") from exc
    return apply_rope_with_cos_sin_cache_inplace
