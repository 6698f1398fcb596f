"""anchor_distances: a candidate segment against A anchors, read straight from the KV pool.

With X the candidate (cand_slots (T,)) and Y_a anchor a, all layers, fp32 math:

    ph_k[a, j]          = mean_{l, h, d} |X.k[l, j, h, d] - Y_a.k[l, head[a, j], h, d]|
                          (spec §4.2 b: head-aligned placeholder distance; same for v)
    pf_k[a, l, h, d]    = sqrt(sum_j (X.k[l, j, h, d] - Y_a.k[l, tail[a, j], h, d])^2)
                          (spec §4.2 a: tail-aligned prefix distance; same for v)
    gate_v[a]           = sqrt(sum_{l, j, h, d} (X.v[l, j] - Y_a.v[l, head[a, j]])^2)
                          (spec §5.1: Frobenius distance of the entropy gate)

head_slots are each anchor's first T slots, tail_slots its last T. The torch reference gathers
the slots and calls ``estimator.placeholder_distances`` / ``prefix_distances`` (which define the
meaning); the Triton kernel reads the slots in place, no (A, L, T, H, D) gather.

Grid: (token blocks, layers, head blocks). A program keeps its (BLOCK_T, BLOCK_H, D) candidate
tile of K and V in registers and loops over the anchors; partial sums go to one fp32 output
buffer with relaxed atomic adds (ph over layers and head blocks, pf over token blocks, the gate's
sum of squares over all programs), then one in-place sqrt on the pf and gate parts. The launcher
checks layouts on the host and the slot ranges with one device read (``plan.read_range_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvcomm_sglang.estimator import placeholder_distances, prefix_distances
from kvcomm_sglang.kernels.plan import INDEX_DTYPES, _dtype, _shape, check_pool, read_range_stats
from kvcomm_sglang.kernels.triton_materialize import _pool_info

POOL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TILE_ELEMENTS = 4096          # candidate tile per program: BLOCK_T * BLOCK_H * next_pow2(D)


@dataclass
class Distances:
    ph_k: torch.Tensor     # (A, T) fp32, head-aligned mean |diff| (§4.2 b)
    ph_v: torch.Tensor     # (A, T)
    pf_k: torch.Tensor     # (A, L, H, D) fp32, tail-aligned L2 over tokens (§4.2 a)
    pf_v: torch.Tensor     # (A, L, H, D)
    gate_v: torch.Tensor   # (A,) fp32, head-aligned Frobenius distance of V (§5.1)


@triton.jit
def _minus(x, buf, slot_stride, slots, chan, mask):
    """x - buf[slots] on a (BLOCK_T, BLOCK_H, C) tile in fp32, zero where masked."""
    y = tl.load(buf + slots[:, None, None] * slot_stride + chan, mask=mask, other=0.0)
    return x - y.to(tl.float32)


@triton.jit(do_not_specialize=["num_tokens", "num_anchors"],     # one kernel for all messages
             do_not_specialize_on_alignment=["cand_ptr", "head_ptr", "tail_ptr"])
def _distances_kernel(k_ptrs, v_ptrs, pool_like, cand_ptr, head_ptr, tail_ptr, out_ptr,
                      k_stride, v_stride, num_tokens, num_anchors, num_layers, inv_count,
                      HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_H: tl.constexpr, DIM_PAD: tl.constexpr, ALIGNED: tl.constexpr):
    layer = tl.program_id(1)
    elem = pool_like.dtype.element_ty
    k_buf = tl.load(k_ptrs + layer).to(tl.pointer_type(elem))
    v_buf = tl.load(v_ptrs + layer).to(tl.pointer_type(elem))
    if ALIGNED:
        k_buf = tl.multiple_of(k_buf, 16)
        v_buf = tl.multiple_of(v_buf, 16)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, DIM_PAD)
    chan2 = heads[:, None] * HEAD_DIM + d[None, :]                  # (BLOCK_H, DIM_PAD)
    c_mask2 = (heads < HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    chan, mask = chan2[None, :, :], t_mask[:, None, None] & c_mask2[None, :, :]
    cand = tl.load(cand_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    xk = tl.load(k_buf + cand[:, None, None] * k_stride + chan, mask=mask, other=0.0)
    xv = tl.load(v_buf + cand[:, None, None] * v_stride + chan, mask=mask, other=0.0)
    xk, xv = xk.to(tl.float32), xv.to(tl.float32)

    row_size = HEADS * HEAD_DIM
    ph_k_ptr, ph_v_ptr = out_ptr, out_ptr + num_anchors * num_tokens
    pf_k_ptr = out_ptr + 2 * num_anchors * num_tokens
    pf_v_ptr = pf_k_ptr + num_anchors * num_layers * row_size
    gate_ptr = pf_v_ptr + num_anchors * num_layers * row_size
    for a in range(num_anchors):
        row = a * num_tokens
        pf_row = (a * num_layers + layer) * row_size
        head = tl.load(head_ptr + row + offs_t, mask=t_mask, other=0).to(tl.int64)
        tail = tl.load(tail_ptr + row + offs_t, mask=t_mask, other=0).to(tl.int64)
        dk = _minus(xk, k_buf, k_stride, head, chan, mask)
        tl.atomic_add(ph_k_ptr + row + offs_t, tl.sum(tl.sum(tl.abs(dk), 2), 1) * inv_count,
                      mask=t_mask, sem="relaxed")
        dv = _minus(xv, v_buf, v_stride, head, chan, mask)
        tl.atomic_add(ph_v_ptr + row + offs_t, tl.sum(tl.sum(tl.abs(dv), 2), 1) * inv_count,
                      mask=t_mask, sem="relaxed")
        tl.atomic_add(gate_ptr + a, tl.sum(dv * dv), sem="relaxed")
        dk = _minus(xk, k_buf, k_stride, tail, chan, mask)
        tl.atomic_add(pf_k_ptr + pf_row + chan2, tl.sum(dk * dk, 0), mask=c_mask2, sem="relaxed")
        dv = _minus(xv, v_buf, v_stride, tail, chan, mask)
        tl.atomic_add(pf_v_ptr + pf_row + chan2, tl.sum(dv * dv, 0), mask=c_mask2, sem="relaxed")


def anchor_distances(pool, cand_slots: torch.Tensor, head_slots: torch.Tensor,
                     tail_slots: torch.Tensor, block_t: int | None = None,
                     num_warps: int | None = None) -> Distances:
    """pool (``k_buffer``/``v_buffer``: L x (slots, H, D)), cand_slots (T,), head_slots (A, T),
    tail_slots (A, T) -> Distances, in one kernel launch (plus a zero fill and a sqrt).

    Raises ValueError for any shape, dtype, device or slot-range mismatch. ``block_t`` (tokens
    per program, a power of two) and ``num_warps`` override the defaults (a tile of about 4096
    candidate elements per tensor, 8 warps for a full tile).
    """
    num_layers, _, heads, head_dim = _check_inputs(pool, cand_slots, head_slots, tail_slots)
    _check_backend(pool)
    num_anchors, num_tokens = head_slots.shape
    row_size, dev = heads * head_dim, pool.k_buffer[0].device
    sizes = (num_anchors * num_tokens,) * 2 + (num_anchors * num_layers * row_size,) * 2
    out = torch.zeros(sum(sizes) + num_anchors, dtype=torch.float32, device=dev)
    if num_anchors and num_tokens:
        k_table, v_table, aligned = _pool_info(pool)
        block_h, block_t = _block_sizes(heads, head_dim, block_t)
        grid = (triton.cdiv(num_tokens, block_t), num_layers, triton.cdiv(heads, block_h))
        dim_pad = triton.next_power_of_2(head_dim)
        _distances_kernel[grid](
            k_table, v_table, pool.k_buffer[0], cand_slots.contiguous(), head_slots.contiguous(),
            tail_slots.contiguous(), out, pool.k_buffer[0].stride(0), pool.v_buffer[0].stride(0),
            num_tokens, num_anchors, num_layers, 1.0 / (num_layers * row_size),
            HEADS=heads, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_H=block_h, DIM_PAD=dim_pad,
            ALIGNED=aligned, num_warps=num_warps or (8 if block_t * block_h * dim_pad >= _TILE_ELEMENTS else 4))
        out[sizes[0] + sizes[1]:].sqrt_()
    ph_k, ph_v, pf_k, pf_v, gate_v = out.split(sizes + (num_anchors,))
    pf_shape = (num_anchors, num_layers, heads, head_dim)
    return Distances(ph_k.view(num_anchors, num_tokens), ph_v.view(num_anchors, num_tokens),
                     pf_k.view(pf_shape), pf_v.view(pf_shape), gate_v)


def anchor_distances_reference(pool, cand_slots: torch.Tensor, head_slots: torch.Tensor,
                               tail_slots: torch.Tensor) -> Distances:
    """The meaning of ``anchor_distances``: gather, then the estimator's torch functions."""
    _check_inputs(pool, cand_slots, head_slots, tail_slots)
    xk, xv = _read(pool, cand_slots)                            # (L, T, H, D)
    head_k, head_v = _read(pool, head_slots)                    # (A, L, T, H, D)
    tail_k, tail_v = _read(pool, tail_slots)
    gate_v = prefix_distances(xv, head_v).flatten(1)           # (A, L * H * D)
    return Distances(placeholder_distances(xk, head_k), placeholder_distances(xv, head_v),
                     prefix_distances(xk, tail_k), prefix_distances(xv, tail_v),
                     torch.linalg.vector_norm(gate_v, dim=1))


def _read(pool, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """slots (...,) -> k, v (..., L, T, H, D) with the layer axis before the last slot axis."""
    k = torch.stack([kb[slots] for kb in pool.k_buffer], dim=-4)
    v = torch.stack([vb[slots] for vb in pool.v_buffer], dim=-4)
    return k, v


def _check_inputs(pool, cand_slots, head_slots, tail_slots) -> tuple[int, int, int, int]:
    """Host checks of layouts, then the slot ranges with one device read -> (L, slots, H, D)."""
    num_layers, num_slots, heads, head_dim = check_pool(pool)
    k0 = pool.k_buffer[0]
    if k0.dtype not in POOL_DTYPES:
        raise ValueError(f"anchor distances support pool dtypes {POOL_DTYPES}, got {k0.dtype}")
    for name, bufs in (("k_buffer", pool.k_buffer), ("v_buffer", pool.v_buffer)):
        if any(b.stride(0) != bufs[0].stride(0) for b in bufs):
            raise ValueError(f"pool.{name} layers differ in slot stride: one stride per list")
    if cand_slots.dim() != 1:
        raise ValueError(f"cand_slots has shape {tuple(cand_slots.shape)}, expected (T,)")
    if head_slots.dim() != 2 or head_slots.shape[1] != cand_slots.shape[0]:
        raise ValueError(f"head_slots has shape {tuple(head_slots.shape)}, expected (A, "
                         f"{cand_slots.shape[0]})")
    _shape("tail_slots", tail_slots, tuple(head_slots.shape))
    slots = (("cand_slots", cand_slots), ("head_slots", head_slots), ("tail_slots", tail_slots))
    for name, t in slots:
        _dtype(name, t, INDEX_DTYPES)
        if t.device != k0.device:
            raise ValueError(f"{name} is on {t.device}, the pool on {k0.device}")
    read_range_stats([(name, t, 0, num_slots) for name, t in slots if t.numel()])
    return num_layers, num_slots, heads, head_dim


def _check_backend(pool) -> None:
    interpreted = not isinstance(_distances_kernel, triton.runtime.JITFunction)
    if pool.k_buffer[0].is_cuda == interpreted:
        raise ValueError("triton anchor distances need CUDA tensors (compiled) or CPU tensors "
                         "with TRITON_INTERPRET=1 set before this module is imported; got "
                         f"{pool.k_buffer[0].device} with the interpreter "
                         f"{'on' if interpreted else 'off'}")


def _block_sizes(heads: int, head_dim: int, block_t: int | None = None) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_T): tokens first (fewer pf atomics), then heads, within the tile. The
    default does not depend on ``num_tokens``: a short message masks part of the tile rather
    than compile its own variant on the scheduler's loop."""
    if block_t is not None and (block_t < 1 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    dim_pad = triton.next_power_of_2(head_dim)
    block_t = block_t or max(1, _TILE_ELEMENTS // dim_pad)
    block_h = min(triton.next_power_of_2(heads), max(1, _TILE_ELEMENTS // (block_t * dim_pad)))
    return block_h, block_t
