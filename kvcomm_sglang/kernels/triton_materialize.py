"""Triton materialize: one launch writes corrected, re-rotated KV for every layer and token.

For layer l, token n, head h, channel d (paper §4.3 offset application, §2.5 RoPE re-rotation;
the plan format is in ``kernels/plan.py``, the ground truth in ``kernels/reference.py``):

    Kt = K[l, src[n]] + [l >= l0] * sum_a wk(n, a, l, h, d) * K[l, dev[n, a]]
    K[l, dst[n]] = R(pos[n]) Kt
    V[l, dst[n]] = V[l, src[n]] + [l >= l0] * sum_a wv(n, a, l, h, d) * V[l, dev[n, a]]

wk = token_wk[n, a] when group[n] < 0, else channel_wk[group[n], a, l, h, d] (same for V);
dev[n, a] = -1 adds nothing. R rotates channel pairs (j, j + R/2) (neox) or (2j, 2j + 1) (GPT-J)
of the first R channels by pos[n] * theta_j, with cos/sin from SGLang's (P, R) fp32 table (cos
half, then sin half); channels R..D pass through. Computes in fp32, stores in the pool dtype.

Grid: (token blocks, layers, head blocks). Layers are reached through int64 tables of the
buffers' data pointers (as SGLang's ``copy_all_layer_kv_cache_tiled`` does), so one launch
covers all layers. A program holds a (BLOCK_N tokens, BLOCK_H heads, channels) tile: V over the
whole head dim, K as the two halves of each rotary pair plus the pass-through tail; one loop over
the anchors corrects all of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomm_sglang.kernels.plan import (MaterializePlan, check_plan_metadata, explain_plan_data,
                                        pool_key)
from kvcomm_sglang.kernels.validate import count_violations

POOL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Default tiles: (V tile elements per program = BLOCK_N * BLOCK_H * next_pow2(D), elements per
# thread), for plans with at most one anchor and with more. From two H200 sweeps
# (``benchmarks/kernels.py --sweep-blocks``, ``docs/performance.md``), Llama-8B KV: 1 token x 8
# heads x 128 on 2 warps was fastest at 1 anchor, 8 tokens on 4 warps at 3 and 20; 128 elements
# per thread spilled registers (10x slower).
_TILES = ((1024, 16), (8192, 64))
_MAX_BLOCK_N = 64
_pointer_tables: dict = {}
_compiled: set = set()         # signatures whose default tiles are compiled


@triton.jit
def _tile(buf, slots, stride, chan, mask):
    """A (BLOCK_N, BLOCK_H, C) tile of rows ``slots`` at channels ``chan``, as fp32."""
    return tl.load(buf + slots[:, None, None] * stride + chan, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight(chan_w_ptr, chan_base, chan, mask, is_templ, tok_w):
    """The tile's anchor weight: channel weights on template rows, token weights elsewhere."""
    chan_w = tl.load(chan_w_ptr + chan_base[:, None, None] + chan, mask=mask & is_templ, other=0.0)
    return tl.where(is_templ, chan_w, tok_w[:, None, None])


# Arguments that change from plan to plan are not specialized (Triton would compile a variant
# per value 1 / multiple of 16, or per 16-byte alignment of a sliced index column): a compile in
# the middle of serving is a ~0.5-0.7 s stall (seen in an H200 TTFT run). Pool strides and the
# channel weights (fresh gathers) stay specialized: they are fixed, and vector loads need them.
_VARYING = ["num_slots", "num_positions", "num_groups", "num_tokens", "num_anchors"]
_VARYING_ALIGNMENT = ["dst_ptr", "src_ptr", "pos_ptr", "dev_ptr", "tok_wk_ptr", "tok_wv_ptr",
                      "group_ptr", "guard_ptr"]


@triton.jit(do_not_specialize=_VARYING, do_not_specialize_on_alignment=_VARYING_ALIGNMENT)
def _materialize_kernel(k_ptrs, v_ptrs, pool_like, dst_ptr, src_ptr, pos_ptr, dev_ptr,
                        tok_wk_ptr, tok_wv_ptr, group_ptr, chan_wk_ptr, chan_wv_ptr, cos_sin,
                        guard_ptr, num_slots, num_positions, num_groups,
                        k_stride, v_stride, cs_stride, num_tokens, num_anchors, num_layers,
                        first_corrected, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        ROTARY_DIM: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_H: tl.constexpr, DIM_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                        TAIL_PAD: tl.constexpr, ALIGNED: tl.constexpr):
    layer = tl.program_id(1)
    elem = pool_like.dtype.element_ty
    k_buf = tl.load(k_ptrs + layer).to(tl.pointer_type(elem))
    v_buf = tl.load(v_ptrs + layer).to(tl.pointer_type(elem))
    if ALIGNED:   # table pointers carry no alignment facts; without this no vector loads
        k_buf = tl.multiple_of(k_buf, 16)
        v_buf = tl.multiple_of(v_buf, 16)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # The validator's count: non-zero masks every store (the plan writes nothing). The loads do
    # not wait for it (with it on the load masks the kernel measured 5-9 % slower than the old
    # validate-read-launch path on an H100); every index is clamped into its table instead, so
    # an invalid plan reads in bounds and writes nothing.
    ok = tl.load(guard_ptr) == 0
    n_mask = offs_n < num_tokens
    src = tl.load(src_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    group = tl.load(group_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)
    src = tl.minimum(tl.maximum(src, 0), num_slots - 1)
    dst = tl.minimum(tl.maximum(dst, 0), num_slots - 1)
    pos = tl.minimum(tl.maximum(pos, 0), num_positions - 1)
    group = tl.minimum(group, num_groups - 1)
    row_size = HEADS * HEAD_DIM
    heads = (tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    h_mask = heads < HEADS
    n3 = n_mask[:, None, None]

    # The tiles: V over the whole head dim, K as the two halves of each rotary pair (+ the tail).
    d = tl.arange(0, DIM_PAD)[None, None, :]
    chan_v, v_mask = heads * HEAD_DIM + d, n3 & h_mask & (d < HEAD_DIM)
    j = tl.arange(0, HALF_PAD)[None, None, :]
    if IS_NEOX:
        i1, i2 = j, j + ROTARY_DIM // 2
    else:
        i1, i2 = 2 * j, 2 * j + 1
    chan1, chan2 = heads * HEAD_DIM + i1, heads * HEAD_DIM + i2
    p_mask = n3 & h_mask & (j < ROTARY_DIM // 2)
    t = ROTARY_DIM + tl.arange(0, TAIL_PAD)[None, None, :]
    chan_t, t_mask = heads * HEAD_DIM + t, n3 & h_mask & (t < HEAD_DIM)

    v = _tile(v_buf, src, v_stride, chan_v, v_mask)
    x1 = _tile(k_buf, src, k_stride, chan1, p_mask)
    x2 = _tile(k_buf, src, k_stride, chan2, p_mask)
    if ROTARY_DIM < HEAD_DIM:
        xt = _tile(k_buf, src, k_stride, chan_t, t_mask)
    if layer >= first_corrected:
        # One pass over the anchors corrects V and both K halves, so each iteration has all its
        # deviation tiles in flight at once; the next anchor's slots are loaded one iteration
        # ahead, so no iteration waits on an index load before its tiles.
        is_templ = (group >= 0)[:, None, None]
        chan_row = tl.maximum(group, 0) * num_anchors
        dev_next = tl.load(dev_ptr + offs_n * num_anchors, mask=n_mask & (num_anchors > 0),
                           other=-1)
        for a in range(num_anchors):
            dev = tl.minimum(dev_next.to(tl.int64), num_slots - 1)
            dev_next = tl.load(dev_ptr + offs_n * num_anchors + a + 1,
                               mask=n_mask & (a + 1 < num_anchors), other=-1)
            has = (dev >= 0)[:, None, None]
            tok_wk = tl.load(tok_wk_ptr + offs_n * num_anchors + a, mask=n_mask, other=0.0)
            tok_wv = tl.load(tok_wv_ptr + offs_n * num_anchors + a, mask=n_mask, other=0.0)
            chan_base = ((chan_row + a) * num_layers + layer) * row_size
            dv = _tile(v_buf, dev, v_stride, chan_v, v_mask & has)
            d1 = _tile(k_buf, dev, k_stride, chan1, p_mask & has)
            d2 = _tile(k_buf, dev, k_stride, chan2, p_mask & has)
            v += _weight(chan_wv_ptr, chan_base, chan_v, v_mask, is_templ, tok_wv) * dv
            x1 += _weight(chan_wk_ptr, chan_base, chan1, p_mask, is_templ, tok_wk) * d1
            x2 += _weight(chan_wk_ptr, chan_base, chan2, p_mask, is_templ, tok_wk) * d2
            if ROTARY_DIM < HEAD_DIM:
                dt = _tile(k_buf, dev, k_stride, chan_t, t_mask & has)
                xt += _weight(chan_wk_ptr, chan_base, chan_t, t_mask, is_templ, tok_wk) * dt

    tl.store(v_buf + dst[:, None, None] * v_stride + chan_v, v.to(elem), mask=v_mask & ok)
    cs = cos_sin + pos[:, None, None] * cs_stride + j
    cos = tl.load(cs, mask=p_mask, other=0.0)
    sin = tl.load(cs + ROTARY_DIM // 2, mask=p_mask, other=0.0)
    k_dst = k_buf + dst[:, None, None] * k_stride
    tl.store(k_dst + chan1, (x1 * cos - x2 * sin).to(elem), mask=p_mask & ok)
    tl.store(k_dst + chan2, (x2 * cos + x1 * sin).to(elem), mask=p_mask & ok)
    if ROTARY_DIM < HEAD_DIM:
        tl.store(k_dst + chan_t, xt.to(elem), mask=t_mask & ok)


def materialize_triton(plan: MaterializePlan, pool, cos_sin: torch.Tensor,
                       block_n: int | None = None, num_warps: int | None = None) -> None:
    """Run ``plan`` on ``pool`` (``k_buffer``/``v_buffer``: L x (slots, H, D)) in one launch.

    Raises ValueError for any plan/pool/table mismatch, and nothing is written then: metadata
    is checked on the host first; the data checks (``kernels.validate``) count violations on the
    device into a guard the kernel reads before any store, and the host reads that count once,
    after the launch (the GPU runs validator and kernel back to back). ``block_n``
    (tokens per program, a power of two) and ``num_warps`` override the default tile
    (``_TILES``).
    """
    num_slots, num_groups = check_plan_metadata(plan, pool, cos_sin)
    k_table, v_table, aligned = _pool_info(pool)
    if plan.num_tokens == 0:
        return
    guard = count_violations(plan, num_slots, cos_sin.shape[0], num_groups)
    _launch(plan, pool, cos_sin, guard, k_table, v_table, aligned, block_n, num_warps)
    if guard.item():          # the one host read: the kernel wrote nothing; say why
        explain_plan_data(plan, num_slots, cos_sin.shape[0], num_groups)
        raise AssertionError("the device validator refused a plan the host checks accept")


def _launch(plan, pool, cos_sin, guard, k_table, v_table, aligned, block_n=None, num_warps=None):
    _, heads, head_dim = pool.k_buffer[0].shape
    num_layers, rotary_dim = len(pool.k_buffer), cos_sin.shape[1]
    tiles = [_block_sizes(heads, head_dim, few) for few in (0, 2)]      # both default tiles
    block_h, block_n_auto, warps_auto = tiles[plan.num_anchors > 1]
    block_n, num_warps = block_n or block_n_auto, num_warps or warps_auto
    if block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    dim_pad = triton.next_power_of_2(head_dim)
    cos_sin = cos_sin.contiguous()
    dev_slots, tok_wk, tok_wv, chan_wk, chan_wv = (
        _nonempty(t.contiguous()) for t in (plan.dev_slots, plan.token_wk, plan.token_wv,
                                            plan.channel_wk, plan.channel_wv))
    args = (k_table, v_table, pool.k_buffer[0],
            plan.dst_slots.contiguous(), plan.src_slots.contiguous(), plan.positions.contiguous(),
            dev_slots, tok_wk, tok_wv, plan.group.contiguous(), chan_wk, chan_wv, cos_sin, guard,
            pool.k_buffer[0].shape[0], cos_sin.shape[0], plan.channel_wk.shape[0],
            pool.k_buffer[0].stride(0), pool.v_buffer[0].stride(0), cos_sin.stride(0),
            plan.num_tokens, plan.num_anchors, num_layers, plan.first_corrected_layer)
    constexprs = dict(HEADS=heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
                      IS_NEOX=bool(plan.is_neox), DIM_PAD=dim_pad,
                      HALF_PAD=triton.next_power_of_2(rotary_dim // 2),
                      TAIL_PAD=triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
                      ALIGNED=aligned)
    grid = (triton.cdiv(plan.num_tokens, block_n), num_layers, triton.cdiv(heads, block_h))
    _compile_default_tiles(args, constexprs, tiles)
    _materialize_kernel[grid](*args, BLOCK_N=block_n, BLOCK_H=block_h, num_warps=num_warps,
                              **constexprs)


def _compile_default_tiles(args, constexprs, tiles) -> None:
    """The first launch of a signature (argument dtypes, constexprs) compiles both default
    tiles, so a plan whose anchor count switches tile later does not stall on a compile."""
    key = tuple(getattr(a, "dtype", type(a)) for a in args) + tuple(constexprs.items())
    if key in _compiled:
        return                     # (interpreted, ``warmup`` compiles nothing and returns)
    for block_h, block_n, num_warps in tiles:
        _materialize_kernel.warmup(*args, grid=(1, 1, 1), BLOCK_N=block_n, BLOCK_H=block_h,
                                   num_warps=num_warps, **constexprs)
    _compiled.add(key)


def _block_sizes(heads: int, head_dim: int, num_anchors: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps) for the default tile (``_TILES``): all heads of a token in
    one program when they fit the tile, then as many tokens as fit."""
    elements, per_thread = _TILES[num_anchors > 1]
    dim_pad = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, elements // dim_pad))
    block_n = max(1, min(_MAX_BLOCK_N, elements // (block_h * dim_pad)))
    num_warps = max(1, min(8, block_n * block_h * dim_pad // (32 * per_thread)))
    return block_h, block_n, num_warps


def _check_pool(pool) -> None:
    """What the kernel relies on beyond ``check_plan``: dtype, one device, one slot stride."""
    k0 = pool.k_buffer[0]
    if k0.dtype not in POOL_DTYPES:
        raise ValueError(f"triton materialize supports pool dtypes {POOL_DTYPES}, got {k0.dtype}")
    for name, bufs in (("k_buffer", pool.k_buffer), ("v_buffer", pool.v_buffer)):
        for layer, b in enumerate(bufs):
            if b.device != k0.device:
                raise ValueError(f"pool.{name}[{layer}] is on {b.device}, layer 0 on {k0.device}")
            if b.stride(0) != bufs[0].stride(0):
                raise ValueError(f"pool.{name}[{layer}] has slot stride {b.stride(0)}, layer 0 "
                                 f"has {bufs[0].stride(0)}: one stride per buffer list")
    interpreted = not isinstance(_materialize_kernel, triton.runtime.JITFunction)
    if k0.is_cuda == interpreted:
        raise ValueError("triton materialize needs CUDA tensors (compiled) or CPU tensors with "
                         "TRITON_INTERPRET=1 set before this module is imported; got "
                         f"{k0.device} with the interpreter {'on' if interpreted else 'off'}")


def _pool_info(pool):
    """(K pointer table, V pointer table, 16-byte aligned?) after the kernel's own pool checks;
    computed once per pool (``pool_key``), so a launch does no per-layer host work."""
    key = pool_key(pool)
    if key not in _pointer_tables:
        _check_pool(pool)
        dev = pool.k_buffer[0].device
        bufs = list(pool.k_buffer) + list(pool.v_buffer)
        if len(_pointer_tables) >= 16:
            _pointer_tables.clear()
        _pointer_tables[key] = (
            torch.tensor([b.data_ptr() for b in pool.k_buffer], dtype=torch.int64, device=dev),
            torch.tensor([b.data_ptr() for b in pool.v_buffer], dtype=torch.int64, device=dev),
            all(b.data_ptr() % 16 == 0 for b in bufs))
    return _pointer_tables[key]


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Never hand the kernel a 0-element tensor (null pointer); it never reads these then."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)
