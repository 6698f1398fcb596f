"""MaterializePlan: the flat work list every materialize backend executes.

One row per destination token, all requests of a batch concatenated. For layer l, token n,
head h, channel d (paper §4.3, in the de-rotated frame of DESIGN §4):

    Kt = K[l, src[n]] + [l >= l0] * sum_a wk(n, a, l, h, d) * K[l, dev[n, a]]
    K[l, dst[n]] = R(pos[n]) Kt
    V[l, dst[n]] = V[l, src[n]] + [l >= l0] * sum_a wv(n, a, l, h, d) * V[l, dev[n, a]]

with wk(n, a, l, h, d) = token_wk[n, a] when group[n] < 0 (content pieces: per-token weights)
and channel_wk[group[n], a, l, h, d] otherwise (template pieces: per-channel weights); the same
for V. dev[n, a] = -1 means anchor a adds nothing to token n. Base and deviation slots hold KV
in the position-0 frame, R is the model's unscaled RoPE (neox or GPT-J layout, ``is_neox``),
and l0 = first_corrected_layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass
class MaterializePlan:
    dst_slots: torch.Tensor      # (N,) int64
    src_slots: torch.Tensor      # (N,) int64
    positions: torch.Tensor      # (N,) int64
    dev_slots: torch.Tensor      # (N, A) int64, -1 = none
    token_wk: torch.Tensor       # (N, A) fp32
    token_wv: torch.Tensor       # (N, A) fp32
    group: torch.Tensor          # (N,) int64, -1 = token weights
    channel_wk: torch.Tensor     # (G, A, L, H, D) fp32
    channel_wv: torch.Tensor     # (G, A, L, H, D) fp32
    first_corrected_layer: int = 1
    is_neox: bool = True         # RoPE layout: rotate-half (neox) or interleaved (GPT-J)

    @property
    def num_tokens(self) -> int:
        return int(self.dst_slots.shape[0])

    @property
    def num_anchors(self) -> int:
        return int(self.dev_slots.shape[1])

    def to(self, device) -> "MaterializePlan":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return MaterializePlan(**fields)

    @classmethod
    def rotation_only(cls, dst_slots, src_slots, positions, num_layers: int, num_heads: int,
                      head_dim: int, is_neox: bool = True) -> "MaterializePlan":
        """A plan with no anchors: gather, rotate to ``positions``, scatter."""
        n, dev = dst_slots.shape[0], dst_slots.device
        empty = torch.zeros(0, 0, num_layers, num_heads, head_dim, device=dev)
        return cls(dst_slots, src_slots, positions, torch.full((n, 0), -1, dtype=torch.long,
                   device=dev), torch.zeros(n, 0, device=dev), torch.zeros(n, 0, device=dev),
                   torch.full((n,), -1, dtype=torch.long, device=dev), empty, empty.clone(),
                   is_neox=is_neox)


def from_reuse_plan(reuse, dst_slots: torch.Tensor, slots_of, num_layers: int, num_heads: int,
                    head_dim: int, is_neox: bool = True, first_corrected_layer: int = 1,
                    rows: tuple[int, int] | None = None) -> MaterializePlan:
    """Flatten a core ``ReusePlan`` (de-rotated storage) into a MaterializePlan.

    ``slots_of(source)`` returns the (N,) pool slots of a stored KV (a CPU tensor or a numpy
    array, e.g. ``PoolKV.slots_np``); sources are the pieces' ``StoredKV`` and
    ``(anchor, consumer, "content" | "template")`` deviations. The pieces are in prompt order,
    each starting where the previous one ends (a ``ReusePlan``'s are).
    Every piece with anchors carries ``packed``, its content's (A, 2T + 2LHD) softmax weights
    (``planner.AnchorWeights.packed``): content rows read their per-token weights from its first
    2T columns, template rows their per-channel weights from the rest. ``rows = (lo, hi)`` keeps
    the destination positions in [lo, hi) (default: every piece); ``dst_slots`` has one slot per
    kept position, in prompt order.

    Everything per row or per piece is numpy on the host, written into one pinned buffer in the
    plan's own layouts: the index columns (src, positions, group, deviation slots (N, A)) and
    the positions of each row's weights ((2, N, A) for K and V) in one table of the pieces'
    packed weights. The device then does a fixed handful of launches whatever the number of
    pieces: one non-blocking copy, one concatenation of the packed weights (plus a zero block
    that padded anchors and unweighted rows point at), one gather of the token weights and one
    of the channel weights (K and V together); no transposes. No host sync.
    """
    device = dst_slots.device
    lo, hi = rows if rows is not None else (0, 1 << 62)
    lhd = num_layers * num_heads * head_dim
    kept, first, bases, tables, total = [], None, {}, [], 0
    for piece in reuse.pieces:
        length = piece.source.length
        s, e = max(piece.start, lo), min(piece.start + length, hi)
        if s >= e:
            continue
        kept.append((piece, s - piece.start, e - s))
        first = s if first is None else first
        if piece.anchors:               # the weight tables, in order: their place in the table
            packed = piece.packed
            if id(packed) not in bases:
                _check_packed(piece, packed, lhd)
                count, width = packed.shape
                bases[id(packed)] = (total, count, width)
                tables.append(packed)
                total += count * width
            elif bases[id(packed)][1] != len(piece.anchors):
                _check_packed(piece, packed, lhd)
    n = sum(m for _, _, m in kept)
    if n != dst_slots.shape[0]:
        raise ValueError(f"plan covers {n} tokens, {dst_slots.shape[0]} dst slots given")
    a = max((len(p.anchors) for p, _, _ in kept), default=0)
    g = sum(1 for p, _, _ in kept if p.kind == "template" and p.anchors)
    # the host buffer: src, pos, group, deviation slots (n, a), token weight positions (2, n, a)
    # and channel weight positions (2, g, a)
    at_tok, at_chan = (3 + a) * n, (3 + 3 * a) * n
    host = _staging(device).take(at_chan + 2 * g * a)
    src, pos, group = host[:n], host[n:2 * n], host[2 * n:3 * n]
    dev = host[3 * n:at_tok].reshape(n, a)
    tok = host[at_tok:at_chan].reshape(2, n, a)
    chan = host[at_chan:].reshape(2, g, a)
    host[2 * n:at_tok].fill(-1)            # content rows' group; no deviation
    host[at_tok:].fill(total)              # padded anchors, unweighted rows: the zero block
    gi, r = 0, 0
    for piece, off, m in kept:
        if piece.start + off != (first if r == 0 else end):
            raise ValueError(f"pieces must be contiguous in prompt order: one starts at "
                             f"{piece.start + off}, the previous one ends at {end}")
        end = piece.start + off + m
        if not _derotated(piece.source):
            raise ValueError("kernels materialize de-rotated storage only (derotated_storage=True)")
        src[r:r + m] = _numpy(slots_of(piece.source))[off:off + m]
        for i, anchor in enumerate(piece.anchors):
            dev[r:r + m, i] = _numpy(slots_of((anchor, reuse.consumer, piece.kind)))[off:off + m]
        if piece.anchors:
            base, k, width = bases[id(piece.packed)]
            tokens = (width - 2 * lhd) // 2
            if piece.kind == "template":
                group[r:r + m] = gi
                chan[0, gi, :k] = np.arange(base + 2 * tokens, base + k * width, width)
                chan[1, gi, :k] = chan[0, gi, :k] + lhd
                gi += 1
            else:
                if off + m > tokens:
                    raise ValueError(f"content piece of {off + m} tokens, weights for {tokens}")
                # row j, anchor i: base + i * width + off + j (K), + tokens (V)
                starts = np.arange(base + off, base + off + k * width, width)
                np.add(starts, _ramp(m), out=tok[0, r:r + m, :k])
                np.add(tok[0, r:r + m, :k], tokens, out=tok[1, r:r + m, :k])
        r += m
    if n:
        pos[:] = np.arange(first, first + n)
    columns = _staging(device).send(host, device)
    at = tables[0].device if tables else device
    table = torch.cat([t.view(-1) for t in tables] + [_zero_block(at, lhd)]).to(device)
    src_t, pos_t, group_t, dev_t, tok_t, chan_t = columns.split(
        [n, n, n, n * a, 2 * n * a, 2 * g * a])
    token_wk, token_wv = table[tok_t.view(2, n, a)].unbind()
    channel_wk, channel_wv = table[chan_t.view(2, g, a, 1) + _arange(device, lhd)].view(
        2, g, a, num_layers, num_heads, head_dim).unbind()
    return MaterializePlan(dst_slots, src_t, pos_t, dev_t.view(n, a), token_wk, token_wv,
                           group_t, channel_wk, channel_wv, first_corrected_layer, is_neox)


def _check_packed(piece, packed, lhd: int) -> None:
    shape = None if packed is None else tuple(packed.shape)
    if shape is None or len(shape) != 2 or shape[0] != len(piece.anchors) \
            or shape[1] < 2 * lhd or (shape[1] - 2 * lhd) % 2 or packed.dtype != torch.float32:
        raise ValueError(f"a {piece.kind} piece with {len(piece.anchors)} anchors needs "
                         f"fp32 packed weights (A, 2T + 2*{lhd}), got {shape}")


_constants: dict = {}


def _zero_block(device: torch.device, size: int) -> torch.Tensor:
    """(size,) fp32 zeros kept per device (only ever read)."""
    key = ("zeros", device, size)
    if key not in _constants:
        _constants[key] = torch.zeros(size, device=device)
    return _constants[key]


def _arange(device: torch.device, size: int) -> torch.Tensor:
    key = ("arange", device, size)
    if key not in _constants:
        _constants[key] = torch.arange(size, device=device)
    return _constants[key]


def _ramp(m: int) -> np.ndarray:
    """(m, 1) int64 0..m-1, a read-only view of one cached array."""
    ramp = _constants.get("ramp")
    if ramp is None or ramp.shape[0] < m:
        ramp = np.arange(max(m, 1 << 14), dtype=np.int64)[:, None]
        ramp.flags.writeable = False
        _constants["ramp"] = ramp
    return ramp[:m]


def _numpy(slots) -> np.ndarray:
    return slots if isinstance(slots, np.ndarray) else slots.numpy()


def _derotated(source) -> bool:
    flag = getattr(source, "derotated", None)      # PoolKV knows it
    if flag is not None:
        return flag
    p = source.positions
    return not (p.numpy().any() if p.device.type == "cpu" else bool(p.any()))


class _Staging:
    """The host side of a plan's one index copy: a pinned int64 buffer on CUDA (the copy does
    not block the host), reused once the previous copy has read it; plain memory elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffer, self.copied = None, None

    def take(self, size: int) -> np.ndarray:
        if not self.cuda:
            return np.empty(size, dtype=np.int64)
        if self.copied is not None and not self.copied.query():
            self.copied.synchronize()          # the previous plan's copy is still reading it
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 1 << 16), dtype=torch.int64, pin_memory=True)
        return self.buffer[:size].numpy()

    def send(self, host: np.ndarray, device: torch.device) -> torch.Tensor:
        if not self.cuda:
            return torch.from_numpy(host)
        out = self.buffer[:host.size].to(device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return out


_stagings: dict = {}


def _staging(device: torch.device) -> _Staging:
    if device not in _stagings:
        _stagings[device] = _Staging(device)
    return _stagings[device]


def check_plan(plan: MaterializePlan, pool, cos_sin: torch.Tensor) -> None:
    """Raise ValueError naming the first mismatch; never let a backend write out of bounds.

    Metadata (shapes, dtypes, devices, strides) is checked on the host without touching data;
    every data-dependent check (value ranges, duplicate dst, dst overlapping src/dev) is computed
    on the device into one small tensor that is read back once: one host sync per call.
    """
    num_slots, num_groups = check_plan_metadata(plan, pool, cos_sin)
    if plan.num_tokens == 0:
        return
    if pool.k_buffer[0].device.type == "cuda":   # fast path: one tiny launch, one read
        from kvcomm_sglang.kernels.validate import count_violations

        if count_violations(plan, num_slots, cos_sin.shape[0], num_groups).tolist() == [0]:
            return
    explain_plan_data(plan, num_slots, cos_sin.shape[0], num_groups)


def check_plan_metadata(plan: MaterializePlan, pool, cos_sin: torch.Tensor) -> tuple[int, int]:
    """The host half of ``check_plan`` (no device data read) -> (pool slots, channel groups)."""
    num_layers, num_slots, num_heads, head_dim = check_pool(pool)
    device = pool.k_buffer[0].device
    n, a = plan.num_tokens, plan.num_anchors
    for name in ("dst_slots", "src_slots", "positions", "group"):
        _shape(f"plan.{name}", getattr(plan, name), (n,))
    _shape("plan.dev_slots", plan.dev_slots, (n, a))
    _shape("plan.token_wk", plan.token_wk, (n, a))
    _shape("plan.token_wv", plan.token_wv, (n, a))
    g = plan.channel_wk.shape[0]
    _shape("plan.channel_wk", plan.channel_wk, (g, a, num_layers, num_heads, head_dim))
    _shape("plan.channel_wv", plan.channel_wv, (g, a, num_layers, num_heads, head_dim))
    for name in ("dst_slots", "src_slots", "positions", "dev_slots", "group"):
        _dtype(f"plan.{name}", getattr(plan, name), INDEX_DTYPES)
    for name in ("token_wk", "token_wv", "channel_wk", "channel_wv"):
        _dtype(f"plan.{name}", getattr(plan, name), (torch.float32,))
    for name, t in plan.__dict__.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"plan.{name} is on {t.device}, the pool on {device}")
    if cos_sin.device != device or cos_sin.dtype != torch.float32 or cos_sin.dim() != 2:
        raise ValueError(f"cos_sin must be a 2-D fp32 table on {device}, got "
                         f"{cos_sin.dtype} {tuple(cos_sin.shape)} on {cos_sin.device}")
    if cos_sin.shape[1] % 2 or cos_sin.shape[1] > head_dim:
        raise ValueError(f"cos_sin has {cos_sin.shape[1]} columns: must be even and <= head "
                         f"dim {head_dim}")
    if not (0 <= plan.first_corrected_layer <= num_layers):
        raise ValueError(f"first_corrected_layer {plan.first_corrected_layer} not in "
                         f"[0, {num_layers}]")
    return num_slots, g


def explain_plan_data(plan: MaterializePlan, num_slots: int, num_positions: int,
                      num_groups: int) -> None:
    """The data half of ``check_plan``, with messages: raise ValueError for the first range
    violated, duplicate dst slots, or dst slots the plan also reads (one device read)."""
    ranges = [("plan.dst_slots", plan.dst_slots, 0, num_slots),
              ("plan.src_slots", plan.src_slots, 0, num_slots),
              ("plan.positions", plan.positions, 0, num_positions),
              ("plan.group", plan.group, -1, num_groups)]
    if plan.num_anchors:
        ranges.append(("plan.dev_slots", plan.dev_slots, -1, num_slots))
    max_writes, max_overlap = read_range_stats(ranges, _write_conflicts(plan, num_slots))
    if max_writes > 1:
        raise ValueError("dst_slots has duplicates: two tokens would write one slot")
    if max_overlap > 0:
        raise ValueError("dst_slots overlap the source or deviation slots of the plan")


_checked_pools: dict = {}


def pool_key(pool) -> tuple:
    """A cheap fingerprint of a pool's buffers: the lists and the first/last data pointers."""
    k, v = pool.k_buffer, pool.v_buffer
    return (id(k), id(v), len(k), len(v), k[0].data_ptr(), v[-1].data_ptr(), tuple(k[0].shape))


def check_pool(pool) -> tuple[int, int, int, int]:
    """Host-only checks that every layer of ``pool`` has one (slots, H, D) layout, dtype and
    device, contiguous in (H, D) -> (L, slots, H, D). One tuple compare per buffer, done once
    per pool (cached by ``pool_key``); the per-layer messages are worked out only on failure."""
    key = pool_key(pool)
    if key in _checked_pools:
        return _checked_pools[key]
    k0 = pool.k_buffer[0]
    num_layers, (num_slots, num_heads, head_dim) = len(pool.k_buffer), tuple(k0.shape)
    layout = (k0.shape, k0.dtype, k0.device, (head_dim, 1))
    if len(pool.v_buffer) != num_layers or not all(
            (b.shape, b.dtype, b.device, b.stride()[1:]) == layout
            for bufs in (pool.k_buffer, pool.v_buffer) for b in bufs):
        _explain_pool(pool)
    if len(_checked_pools) >= 16:
        _checked_pools.clear()
    _checked_pools[key] = (num_layers, num_slots, num_heads, head_dim)
    return _checked_pools[key]


def _explain_pool(pool) -> None:
    k0 = pool.k_buffer[0]
    num_layers, shape = len(pool.k_buffer), tuple(k0.shape)
    for buf_name, bufs in (("k_buffer", pool.k_buffer), ("v_buffer", pool.v_buffer)):
        if len(bufs) != num_layers:
            raise ValueError(f"pool.{buf_name} has {len(bufs)} layers, expected {num_layers}")
        for layer, b in enumerate(bufs):
            if tuple(b.shape) != shape or b.dtype != k0.dtype:
                raise ValueError(f"pool.{buf_name}[{layer}] is {b.dtype} {tuple(b.shape)}, "
                                 f"expected {k0.dtype} {shape}")
            if b.device != k0.device:
                raise ValueError(f"pool.{buf_name}[{layer}] is on {b.device}, layer 0 on "
                                 f"{k0.device}")
            if b.stride(-1) != 1 or b.stride(-2) != shape[-1]:
                raise ValueError(f"pool.{buf_name}[{layer}] must be contiguous in (H, D)")
    raise AssertionError("pool layout check failed without a reason")


def read_range_stats(ranges: list, extra: tuple = ()) -> list[int]:
    """Check ``ranges`` ((label, tensor, lo, hi): every value in [lo, hi)) with ONE host sync.

    Min and max of every (non-empty) tensor and the 0-d integer tensors ``extra`` are stacked
    on the device and read back together; raises ValueError for the first range violated,
    else returns the values of ``extra``.
    """
    parts = [s for _, t, _, _ in ranges for s in torch.aminmax(t)] + list(extra)
    if not parts:
        return []
    values = torch.stack(parts).tolist()
    for i, (label, _, lo, hi) in enumerate(ranges):
        vmin, vmax = values[2 * i], values[2 * i + 1]
        if vmin < lo or vmax >= hi:
            raise ValueError(f"{label} has values in [{vmin}, {vmax}], allowed [{lo}, {hi})")
    return values[2 * len(ranges):]


def _write_conflicts(plan: MaterializePlan, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0-d device tensors: the most tokens writing one slot, and the most dst writes landing on
    a slot the plan reads (src or dev). A slot-count bitmap; indices are clamped so that
    out-of-range plans (reported first, by their range check) cannot fault here."""
    writes = torch.zeros(num_slots + 1, dtype=torch.int32, device=plan.dst_slots.device)
    dst = plan.dst_slots.clamp(0, num_slots - 1)
    writes.index_add_(0, dst, torch.ones_like(dst, dtype=torch.int32))
    read = torch.cat([plan.src_slots.to(torch.int64), plan.dev_slots.reshape(-1).to(torch.int64)])
    read = read.clamp(-1, num_slots - 1)          # -1 (no deviation): the never-written last entry
    return writes.amax(), writes[read].amax()


def _shape(label: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{label} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _dtype(label: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{label} has dtype {t.dtype}, expected one of {dtypes}")
