"""Plan validation on the device in two tiny launches: counts range violations, duplicate dst
slots and dst slots the plan also reads into one int32. ``check_plan`` (CUDA) reads it before
any backend runs; the Triton materialize kernel takes it as a guard (a non-zero count masks
every store) and the host reads it once after the launch. A non-zero count is then explained,
with the problem named, by ``plan.explain_plan_data``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _writes_kernel(dst_ptr, src_ptr, pos_ptr, group_ptr, dev_ptr, bitmap_ptr, count_ptr,
                   num_tokens, num_anchors, num_slots, num_positions, num_groups,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_tokens
    dst = tl.load(dst_ptr + offs, mask=mask, other=0).to(tl.int64)
    src = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + offs, mask=mask, other=0).to(tl.int64)
    group = tl.load(group_ptr + offs, mask=mask, other=-1).to(tl.int64)
    bad = (dst < 0) | (dst >= num_slots) | (src < 0) | (src >= num_slots)
    bad = bad | (pos < 0) | (pos >= num_positions) | (group < -1) | (group >= num_groups)
    for a in range(num_anchors):
        dev = tl.load(dev_ptr + offs * num_anchors + a, mask=mask, other=-1).to(tl.int64)
        bad = bad | (dev < -1) | (dev >= num_slots)
    dst_ok = mask & (dst >= 0) & (dst < num_slots)
    prev = tl.atomic_add(bitmap_ptr + dst, 1, mask=dst_ok)
    dup = dst_ok & (prev > 0)
    total = tl.sum((mask & bad).to(tl.int32), axis=0) + tl.sum(dup.to(tl.int32), axis=0)
    tl.atomic_add(count_ptr, total)


@triton.jit
def _reads_kernel(src_ptr, dev_ptr, bitmap_ptr, count_ptr, num_tokens, num_anchors, num_slots,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_tokens
    src = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
    ok = mask & (src >= 0) & (src < num_slots)
    hits = tl.load(bitmap_ptr + src, mask=ok, other=0) > 0
    total = tl.sum(hits.to(tl.int32), axis=0)
    for a in range(num_anchors):
        dev = tl.load(dev_ptr + offs * num_anchors + a, mask=mask, other=-1).to(tl.int64)
        ok = mask & (dev >= 0) & (dev < num_slots)
        total += tl.sum((tl.load(bitmap_ptr + dev, mask=ok, other=0) > 0).to(tl.int32), axis=0)
    tl.atomic_add(count_ptr, total)


def count_violations(plan, num_slots: int, num_positions: int, num_groups: int) -> torch.Tensor:
    """(1,) int32 device tensor: how many range, duplicate or overlap problems ``plan`` has."""
    device = plan.dst_slots.device
    bitmap = torch.zeros(num_slots, dtype=torch.int32, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    n, a = plan.num_tokens, plan.num_anchors
    dev = plan.dev_slots.contiguous() if a else plan.dst_slots   # never read when a == 0
    grid = (triton.cdiv(n, BLOCK),)
    _writes_kernel[grid](plan.dst_slots.contiguous(), plan.src_slots.contiguous(),
                         plan.positions.contiguous(), plan.group.contiguous(), dev, bitmap, count,
                         n, a, num_slots, num_positions, num_groups, BLOCK=BLOCK)
    _reads_kernel[grid](plan.src_slots.contiguous(), dev, bitmap, count, n, a, num_slots,
                        BLOCK=BLOCK)
    return count
