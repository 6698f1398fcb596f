"""Plan validation on the device in one launch: counts range violations, duplicate dst slots and
dst slots the plan also reads into one int32. ``check_plan`` (CUDA) reads it before any backend
runs; the Triton materialize kernel takes it as a guard (a non-zero count masks every store) and
the host reads it once after the launch. A non-zero count is then explained, with the problem
named, by ``plan.explain_plan_data``.

One program walks the plan twice: first it stamps every dst slot with the plan's epoch in a
per-pool slot table (a slot already carrying this epoch is a duplicate), then it looks up every
src and deviation slot there. Stamps of earlier plans carry smaller epochs, so the table is
zeroed only when it is created and when the epoch counter wraps: no memset and no count reset
per plan (the two-launch version needed both). Values that change per plan (the epoch, sizes,
offsets of sliced index columns) are not specialized: one compiled kernel serves every plan.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, ANCHORS = 1024, 8      # tokens x anchors per step of the one program
EPOCH_LIMIT = 2**31 - 1
_stamps: dict = {}           # (device, stream, num_slots) -> [int32 slot table, last epoch]


@triton.jit
def _anchor_tile(dev_ptr, offs, mask, a0, num_anchors, ANCHORS: tl.constexpr):
    """Deviation slots of anchors a0 .. a0 + ANCHORS - 1 for the tokens ``offs`` and the mask
    of the existing ones: (BLOCK, ANCHORS)."""
    a = a0 + tl.arange(0, ANCHORS)[None, :]
    dev_mask = mask[:, None] & (a < num_anchors)
    dev = tl.load(dev_ptr + offs[:, None] * num_anchors + a, mask=dev_mask, other=-1)
    return dev.to(tl.int64), dev_mask


@triton.jit(do_not_specialize=["epoch", "num_tokens", "num_anchors", "num_slots", "num_positions",
                                "num_groups"],
             do_not_specialize_on_alignment=["dst_ptr", "src_ptr", "pos_ptr", "group_ptr",
                                             "dev_ptr"])
def _validate_kernel(dst_ptr, src_ptr, pos_ptr, group_ptr, dev_ptr, stamp_ptr, count_ptr, epoch,
                     num_tokens, num_anchors, num_slots, num_positions, num_groups,
                     BLOCK: tl.constexpr, ANCHORS: tl.constexpr):
    total = 0
    for start in range(0, num_tokens, BLOCK):        # ranges; stamp the writes
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_tokens
        dst = tl.load(dst_ptr + offs, mask=mask, other=0).to(tl.int64)
        src = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + offs, mask=mask, other=0).to(tl.int64)
        group = tl.load(group_ptr + offs, mask=mask, other=-1).to(tl.int64)
        bad = (dst < 0) | (dst >= num_slots) | (src < 0) | (src >= num_slots)
        bad = bad | (pos < 0) | (pos >= num_positions) | (group < -1) | (group >= num_groups)
        for a0 in range(0, num_anchors, ANCHORS):
            dev, dev_mask = _anchor_tile(dev_ptr, offs, mask, a0, num_anchors, ANCHORS)
            dev_bad = dev_mask & ((dev < -1) | (dev >= num_slots))
            bad = bad | (tl.max(dev_bad.to(tl.int32), axis=1) > 0)
        dst_ok = mask & (dst >= 0) & (dst < num_slots)
        prev = tl.atomic_xchg(stamp_ptr + dst, epoch, mask=dst_ok)
        dup = dst_ok & (prev == epoch)
        total += tl.sum((mask & bad).to(tl.int32), axis=0) + tl.sum(dup.to(tl.int32), axis=0)
    tl.debug_barrier()                               # every stamp lands before any lookup
    for start in range(0, num_tokens, BLOCK):        # reads of stamped slots
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_tokens
        src = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
        ok = mask & (src >= 0) & (src < num_slots)
        hit = tl.load(stamp_ptr + src, mask=ok, other=0, cache_modifier=".cg") == epoch
        total += tl.sum((ok & hit).to(tl.int32), axis=0)
        for a0 in range(0, num_anchors, ANCHORS):
            dev, dev_mask = _anchor_tile(dev_ptr, offs, mask, a0, num_anchors, ANCHORS)
            dev_ok = dev_mask & (dev >= 0) & (dev < num_slots)
            dev_hit = tl.load(stamp_ptr + dev, mask=dev_ok, other=0, cache_modifier=".cg") == epoch
            total += tl.sum(tl.sum((dev_ok & dev_hit).to(tl.int32), axis=1), axis=0)
    tl.store(count_ptr, total)


def count_violations(plan, num_slots: int, num_positions: int, num_groups: int) -> torch.Tensor:
    """(1,) int32 device tensor: how many range, duplicate or overlap problems ``plan`` has."""
    device = plan.dst_slots.device
    stamps, epoch = _next_epoch(device, num_slots)
    count = torch.empty(1, dtype=torch.int32, device=device)
    n, a = plan.num_tokens, plan.num_anchors
    dev = plan.dev_slots.contiguous() if a else plan.dst_slots   # never read when a == 0
    _validate_kernel[(1,)](plan.dst_slots.contiguous(), plan.src_slots.contiguous(),
                           plan.positions.contiguous(), plan.group.contiguous(), dev, stamps,
                           count, epoch, n, a, num_slots, num_positions, num_groups, BLOCK=BLOCK,
                           ANCHORS=ANCHORS, num_warps=8)
    return count


def _next_epoch(device: torch.device, num_slots: int) -> tuple[torch.Tensor, int]:
    """The slot table of (device, current stream, pool size) and a fresh epoch for one plan.
    Per stream: plans validated on one stream run one after the other, so an epoch's stamps
    are only ever its own plan's."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, num_slots)
    entry = _stamps.get(key)
    if entry is None or entry[1] >= EPOCH_LIMIT:
        if entry is None and len(_stamps) >= 16:
            _stamps.clear()
        entry = _stamps[key] = [torch.zeros(num_slots, dtype=torch.int32, device=device), 0]
    entry[1] += 1
    return entry[0], entry[1]
