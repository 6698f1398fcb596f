"""Kernel benchmark: materialize (torch reference, Triton, FlashInfer) and the anchor distances
(torch reference, Triton) against a plain copy of the same bytes on the same card, plus the
request-time reuse path.

GPU (Llama-3.1-8B KV: 32 layers, 8 KV heads, head dim 128, bf16 pool):
    python benchmarks/kernels.py [--flashinfer-wheel-dir DIR] [--out bench-results/kernels.json]
CPU check (tiny shapes, Triton interpreter):
    python benchmarks/kernels.py --smoke

Rows: op, backend, tokens, anchors, ms (median), bytes (what the op must read + write), copy_ms
(device-to-device copy moving the same bytes, its device time alone), bandwidth_fraction
(copy_ms / ms), max_rel_err, host_syncs (synchronizing CUDA calls in one call, from torch's
sync debug mode; GPU only). Ops:
    materialize        the plan executor; max_rel_err = max |out - fp64| / max |fp64| over K, V;
                       backend triton-kernel: the fused kernel's launch alone (plan validated
                       once), its GPU time with the launch queued ahead (``Timer.gpu``);
                       triton-kernel-old: the same for ``--compare-kernel``'s kernel; triton:
                       the whole call as a caller waits for it
    check_plan         plan validation alone (metadata on the host, one device read)
    call-phase         the whole Triton call split (GPU only): host time of the metadata
                       checks, the validator's launch, the kernel's launch, then the wait in
                       the guard's read
    distances          anchor_distances of every content piece against the anchors, Triton vs
                       the torch reference on gathered slots; max_rel_err of Triton vs torch
    weights            the old path: torch estimator on gathered (A, L, T, H, D) anchor copies
    capture-distances  what capturing the contents costs, off the request path: the Triton
                       distances row (the same work, the same timing) in the reuse-path breakdown
    reuse-path         what a request waits for: plan flattening and Triton materialize (with
                       validation); the planner computes the weights when a content is
                       captured (``KVCommState.prepare_weights``), off the request path
    reuse-path+weights the same plus the softmax of the cached distances of the first
                       `anchors` anchors (the weights as a request would compute them itself)
    set-weights        that softmax alone (``planner.set_weights``: one stack + softmax per piece)
    plan-flatten       ``from_reuse_plan`` alone (index columns and weight positions by numpy in
                       pinned memory, one non-blocking copy; weights gathered from one table)
                       (these four rows are timed in turn within each rep, 5x the reps: they
                       are host-bound, and the host's speed drifts during a run)
    entropy-gate       the predict-as-anchor gate on one piece (torch)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
import warnings
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"      # read when the Triton kernels are decorated
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvcomm_sglang.estimator import (entropy_gate, placeholder_distances,  # noqa: E402
                                     prefix_distances, softmax_weights)
from kvcomm_sglang.kernels import MaterializePlan, TensorKVPool, check_plan  # noqa: E402
from kvcomm_sglang.kernels.plan import from_reuse_plan  # noqa: E402
from kvcomm_sglang.planner import Match, PiecePlan, set_weights  # noqa: E402
from kvcomm_sglang.kernels.distances import (anchor_distances,  # noqa: E402
                                             anchor_distances_reference)
from kvcomm_sglang.kernels.reference import _weights, materialize_reference  # noqa: E402
from kvcomm_sglang.kernels.triton_materialize import materialize_triton  # noqa: E402
from kvcomm_sglang.rope import RopeSpec  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
FULL = dict(layers=32, heads=8, head_dim=128, tokens=(512, 1024, 3584), anchors=(1, 3, 20),
            content=(1024,) + (511,) * 5, template=16, match_anchors=20, plan_anchors=(3, 20),
            positions=8192)
COPY_CAP_BYTES = 2 << 30
SPIN_CYCLES = 400_000        # ~0.2 ms at H100/H200 clocks: longer than any launch's host work
SMOKE = dict(layers=2, heads=2, head_dim=32, tokens=(7, 33), anchors=(1, 3),
             content=(16, 9, 9), template=4, match_anchors=3, plan_anchors=(1, 3), positions=256)


class Timer:
    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        """Median milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
        return self.interleaved([fn])[0]

    def interleaved(self, fns, reps=None, spin=False) -> list[float]:
        """Median milliseconds of each of ``fns``, timed in turn within every rep, so that a
        slow spell of the host falls on all of them alike (host-bound rows scatter by ±25 %
        from call to call). ``spin``: see ``gpu``."""
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        self.sync()
        times = [[] for _ in fns]
        for _ in range(reps or self.reps):
            for fn, out in zip(fns, times):
                out.append(self._once(fn, spin))
        return [statistics.median(t) for t in times]

    def _once(self, fn, spin=False) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if spin:
                torch.cuda._sleep(SPIN_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def gpu(self, fn) -> float:
        """Median milliseconds of ``fn()``'s device work alone: on CUDA a spin kernel runs ahead
        of the start event, so the host has queued ``fn``'s launches before the device reaches
        them and launch latency is not counted (``__call__`` counts it: what a caller waits).
        Only for ``fn`` without host syncs; the same as ``__call__`` on CPU."""
        return self.interleaved([fn], spin=True)[0]

    def copy_ms(self, nbytes: int) -> float:
        """A device-to-device copy that reads nbytes/2 and writes nbytes/2, its device time alone
        (``gpu``; timed on at most 2 x 2 GiB and scaled linearly above that, to keep memory for
        the ops themselves)."""
        half = max(nbytes // 2, 1)
        size = min(half, COPY_CAP_BYTES)
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return self.gpu(lambda: dst.copy_(src)) * half / size


def count_syncs(fn):
    """Synchronizing CUDA calls in one ``fn()`` (torch's sync debug mode); None on CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def row(op, backend, tokens, anchors, ms, nbytes, copy_ms, max_rel_err=None, host_syncs=None):
    return dict(op=op, backend=backend, tokens=tokens, anchors=anchors, ms=ms, bytes=nbytes,
                copy_ms=copy_ms, bandwidth_fraction=copy_ms / ms if copy_ms else None,
                max_rel_err=max_rel_err, host_syncs=host_syncs)


def make_pool(cfg, num_slots, dtype, device):
    pool = TensorKVPool(cfg["layers"], num_slots, cfg["heads"], cfg["head_dim"], dtype, device)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, device=device).to(dtype))
    return pool


def make_plan(cfg, n, a, device, rows=None, groups=None, token_w=None, channel_w=None):
    """dst = slots 1..n, src = the next n, anchor a's deviations a contiguous run after those.
    Default weights: 2/3 content rows (token weights), 1/3 template rows in 4 groups."""
    ar = lambda *s: torch.arange(*s, device=device)  # noqa: E731
    dst, src = ar(1, n + 1), ar(n + 1, 2 * n + 1)
    dev = ar(2 * n + 1, (2 + a) * n + 1).view(a, n).t().contiguous()
    if groups is None:
        num_content = (2 * n) // 3
        groups = torch.full((n,), -1, device=device)
        groups[num_content:] = ar(n - num_content) * 4 // max(n - num_content, 1)
    if token_w is None:
        token_w = [torch.randn(n, a, device=device).softmax(-1) for _ in range(2)]
        channel_w = [torch.randn(4, a, cfg["layers"], cfg["heads"], cfg["head_dim"],
                                 device=device).softmax(1) for _ in range(2)]
    pos = torch.randint(0, cfg["positions"] - n, (1,)).item() + ar(n)
    return MaterializePlan(dst, src, pos, dev, token_w[0], token_w[1], groups, channel_w[0],
                           channel_w[1], first_corrected_layer=1, is_neox=True)


def materialize_bytes(cfg, n, a, itemsize):
    return cfg["layers"] * n * 2 * cfg["heads"] * cfg["head_dim"] * itemsize * (2 + a)


def max_rel_err_fp64(plan, pool, cos_sin) -> float:
    """max |pool[dst] - exact| / max |exact|, exact computed layer by layer in fp64."""
    half, r = cos_sin.shape[1] // 2, cos_sin.shape[1]
    table = cos_sin[plan.positions].double()
    cos, sin = table[:, None, :half], table[:, None, half:]
    has_dev, dev = plan.dev_slots >= 0, plan.dev_slots.clamp(min=0)
    worst = 0.0
    for layer, (kb, vb) in enumerate(zip(pool.k_buffer, pool.v_buffer)):
        k, v = kb[plan.src_slots].double(), vb[plan.src_slots].double()
        if plan.num_anchors and layer >= plan.first_corrected_layer:
            wk, wv = _weights(plan, layer, has_dev)
            k = k + (wk.double() * kb[dev].double()).sum(1)
            v = v + (wv.double() * vb[dev].double()).sum(1)
        x1, x2 = k[..., :half], k[..., half:r]          # neox layout (the plans here)
        k = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, k[..., r:]], dim=-1)
        for got, want in ((kb[plan.dst_slots], k), (vb[plan.dst_slots], v)):
            worst = max(worst, float((got.double() - want).abs().max() / want.abs().max()))
    return worst


def load_flashinfer(wheel_dir):
    """materialize_flashinfer, or None and the reason it is unavailable."""
    if wheel_dir:                           # offline: dependencies from the same folder if there
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheel_dir]
        if subprocess.run(pip + ["flashinfer-python"], check=False).returncode:
            wheels = sorted(str(w) for w in Path(wheel_dir).glob("*.whl"))  # e.g. + tvm-ffi
            subprocess.run(pip + ["--no-deps"] + wheels, check=False)
    try:
        import flashinfer.rope  # noqa: F401
        from kvcomm_sglang.kernels.flashinfer_rope import materialize_flashinfer
        return materialize_flashinfer, "ok"
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"unavailable: {type(exc).__name__}: {exc}"


def bench_materialize(cfg, timer, pool, cos_sin, backends, rows, old_kernel=None):
    for n in cfg["tokens"]:
        for a in cfg["anchors"]:
            plan = make_plan(cfg, n, a, pool.k_buffer[0].device)
            nbytes = materialize_bytes(cfg, n, a, pool.k_buffer[0].element_size())
            copy_ms = timer.copy_ms(nbytes)
            for name, fn in backends.items():
                try:
                    ms = timer(lambda: fn(plan, pool, cos_sin))
                    err = max_rel_err_fp64(plan, pool, cos_sin)
                except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
                    print(f"  {name} failed on N={n} A={a}: {type(exc).__name__}: {exc}")
                    continue
                syncs = count_syncs(lambda: fn(plan, pool, cos_sin)) if name == "triton" else None
                rows.append(row("materialize", name, n, a, ms, nbytes, copy_ms, err, syncs))
            if "triton" in backends:      # the fused kernel alone: the plan validated once
                kernels = {"triton-kernel": None, "triton-kernel-old": old_kernel}
                for backend, module in kernels.items():
                    if backend == "triton-kernel" or module is not None:
                        launch = triton_kernel_only(plan, pool, cos_sin, module=module)
                        rows.append(row("materialize", backend, n, a, timer.gpu(launch), nbytes,
                                        copy_ms, host_syncs=count_syncs(launch)))
            check = lambda: check_plan(plan, pool, cos_sin)  # noqa: E731
            rows.append(row("check_plan", "torch", n, a, timer(check), 0, None,
                            host_syncs=count_syncs(check)))


def bench_call_phases(cfg, timer, pool, cos_sin, rows):
    """Where the whole call's time goes, on the largest token count (GPU only): host time of
    the metadata checks, of the validator's launch, of the kernel's launch, and the wait in the
    guard's read (the GPU's remaining work); medians of synchronized calls."""
    from kvcomm_sglang.kernels import triton_materialize as tm
    from kvcomm_sglang.kernels.plan import check_plan_metadata
    from kvcomm_sglang.kernels.validate import count_violations

    n = max(cfg["tokens"])
    for a in cfg["anchors"]:
        plan = make_plan(cfg, n, a, pool.k_buffer[0].device)
        materialize_triton(plan, pool, cos_sin)
        phases = {k: [] for k in ("metadata", "validate", "launch", "wait")}
        for _ in range(timer.reps):
            timer.sync()
            t0 = time.perf_counter()
            num_slots, groups = check_plan_metadata(plan, pool, cos_sin)
            k_table, v_table, aligned = tm._pool_info(pool)
            t1 = time.perf_counter()
            guard = count_violations(plan, num_slots, cos_sin.shape[0], groups)
            t2 = time.perf_counter()
            tm._launch(plan, pool, cos_sin, guard, k_table, v_table, aligned)
            t3 = time.perf_counter()
            guard.item()
            t4 = time.perf_counter()
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(dt * 1e3)
        for name, times in phases.items():
            rows.append(row("call-phase", name, n, a, statistics.median(times), 0, None))


def triton_kernel_only(plan, pool, cos_sin, block_n=None, num_warps=None, module=None):
    """``materialize_triton`` without its per-call validation and guard read: the plan is
    validated once here, then each call is the kernel's launch alone with a zero guard, timed
    with ``Timer.gpu``: the fused kernel's own GPU time (what the bandwidth goal is about); the
    ``triton`` rows time the whole call, validation, launches and the host read included.
    ``module``: another tree's ``triton_materialize`` (``load_module``), else ours."""
    from kvcomm_sglang.kernels import triton_materialize

    module = module or triton_materialize
    check_plan(plan, pool, cos_sin)
    k_table, v_table, aligned = module._pool_info(pool)
    guard = torch.zeros(1, dtype=torch.int32, device=pool.k_buffer[0].device)
    return lambda: module._launch(plan, pool, cos_sin, guard, k_table, v_table, aligned, block_n,
                                  num_warps)


def load_module(path, name):
    """Another tree's module file (e.g. the previous commit's ``triton_materialize.py`` or
    ``plan.py``) loaded as ``name`` beside ours; it imports everything else from this tree, so
    both versions are timed in one process on the same data."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def sweep_triton_blocks(cfg, timer, pool, cos_sin, rows, anchors=None, distances=True,
                        old_kernel=None):
    """Triton at other tile sizes, on the largest token count and the given anchor counts
    (default: the largest); rows backend triton[bn,w] time the whole call, triton-kernel[bn,w]
    the kernel alone (triton-kernel-old[bn,w]: ``old_kernel``'s). Each row is printed as it is
    timed."""
    n = max(cfg["tokens"])
    for a in anchors or [max(cfg["anchors"])]:
        plan = make_plan(cfg, n, a, pool.k_buffer[0].device)
        nbytes = materialize_bytes(cfg, n, a, pool.k_buffer[0].element_size())
        copy_ms = timer.copy_ms(nbytes)
        for block_n in (1, 2, 4, 8, 16):
            for warps in (2, 4, 8):
                call = lambda: materialize_triton(plan, pool, cos_sin, block_n, warps)  # noqa: E731
                fns = [("triton", call, timer),
                       ("triton-kernel", triton_kernel_only(plan, pool, cos_sin, block_n, warps),
                        timer.gpu)]
                if old_kernel is not None:
                    fns.append(("triton-kernel-old", triton_kernel_only(
                        plan, pool, cos_sin, block_n, warps, old_kernel), timer.gpu))
                for backend, fn, time_it in fns:
                    rows.append(row("materialize", f"{backend}[bn={block_n},w={warps}]", n, a,
                                    time_it(fn), nbytes, copy_ms))
                    print_table(rows[-1:], header=False)
    if not distances:
        return
    inputs = distance_inputs(cfg, cfg["match_anchors"], pool.k_buffer[0].device)
    tokens, nbytes = sum(cfg["content"]), distance_bytes(cfg, pool)
    copy_ms = timer.copy_ms(nbytes)
    for block_t in (8, 16, 32, 64):
        for warps in (4, 8):
            ms = timer(lambda: [anchor_distances(pool, *x, block_t=block_t, num_warps=warps)
                                for x in inputs])
            rows.append(row("distances", f"triton[bt={block_t},w={warps}]", tokens,
                            cfg["match_anchors"], ms, nbytes, copy_ms))


def matching_inputs(cfg, a, dtype, device):
    """Per content piece: base K, V (L, T, H, D) and A anchor embeddings K, V (A, L, T, H, D)."""
    shape = (cfg["layers"], None, cfg["heads"], cfg["head_dim"])
    pieces = []
    for t in cfg["content"]:
        s = shape[:1] + (t,) + shape[2:]
        pieces.append(tuple(torch.randn(*lead, *s, device=device).to(dtype)
                            for lead in ((), (), (a,), (a,))))
    return pieces


def weights_step(pieces):
    """The reuse path's matching: per content piece, token weights (A, T) from the head-aligned
    mean |diff| and channel weights (A, L, H, D) for the template piece after it (tail L2)."""
    return [(softmax_weights(placeholder_distances(bk, ek)).t(),
             softmax_weights(placeholder_distances(bv, ev)).t(),
             softmax_weights(prefix_distances(bk, ek)), softmax_weights(prefix_distances(bv, ev)))
            for bk, bv, ek, ev in pieces]


class _Block:
    """A stored block as the server holds it: pool slots (host copy), position-0 frame."""

    def __init__(self, slots):
        self.slots_cpu, self.length = slots, len(slots)
        self.positions = torch.zeros(len(slots), dtype=torch.long)


def reuse_pieces(cfg, a):
    """The prompt as the server's planner hands it to ``from_reuse_plan``: content piece i, then
    template piece i, each with a anchors whose deviations sit in their own pool slots."""
    total = sum(cfg["content"]) + cfg["template"] * len(cfg["content"])
    pieces, start, slot = [], 0, total + 1        # dst slots are 1..total; the rest above them
    for t in cfg["content"]:
        for kind, n in (("content", t), ("template", cfg["template"])):
            anchors = []
            for _ in range(a):
                dev = _Block(torch.arange(slot, slot + n))
                slot += n
                anchors.append(SimpleNamespace(deviations={"c": SimpleNamespace(content=dev,
                                                                                template=dev)}))
            pieces.append(PiecePlan(kind, "user_question", _Block(torch.arange(slot, slot + n)),
                                    start, anchors))
            slot, start = slot + n, start + n
    return pieces


def _slots_of(source):
    if isinstance(source, tuple):
        anchor, consumer, kind = source
        source = getattr(anchor.deviations[consumer], kind)
    return source.slots_cpu


def reuse_plan(cfg, pieces, weights, device):
    """What a request does after planning: attach the weights as the planner does, flatten with
    the product's ``from_reuse_plan``."""
    for i, w in enumerate(weights):
        content, template = pieces[2 * i], pieces[2 * i + 1]
        content.weights_k, content.weights_v, content.packed = w.token_k, w.token_v, w.packed
        template.weights_k, template.weights_v, template.packed = (w.channel_k, w.channel_v,
                                                                   w.packed)
    n = sum(p.source.length for p in pieces)
    dst = torch.arange(1, n + 1, device=device)
    return from_reuse_plan(SimpleNamespace(consumer="c", pieces=pieces), dst, _slots_of,
                           cfg["layers"], cfg["heads"], cfg["head_dim"])


def distance_inputs(cfg, a, device):
    """(cand_slots (T,), head_slots (A, T), tail_slots (A, T)) per content piece: the piece at one
    run of T pool slots, each of its A anchors (T tokens long, so head = tail) at another."""
    inputs, start = [], 1
    for t in cfg["content"]:
        slots = torch.arange(start, start + (1 + a) * t, device=device)
        anchors = slots[t:].view(a, t)
        inputs.append((slots[:t], anchors, anchors))
        start += (1 + a) * t
    return inputs


def distance_bytes(cfg, pool):
    """The candidates' and their anchors' K and V, every layer, each read once."""
    k0 = pool.k_buffer[0]
    per_token = 2 * len(pool.k_buffer) * k0[0].numel() * k0.element_size()
    return (1 + cfg["match_anchors"]) * sum(cfg["content"]) * per_token


def bench_distances(cfg, timer, pool, rows):
    """Triton vs torch anchor distances over every content piece; returns Triton's results as
    the planner caches them at capture (``Match`` rows per piece)."""
    a, inputs = cfg["match_anchors"], distance_inputs(cfg, cfg["match_anchors"],
                                                      pool.k_buffer[0].device)
    tokens, nbytes = sum(cfg["content"]), distance_bytes(cfg, pool)
    copy_ms = timer.copy_ms(nbytes)
    got = [anchor_distances(pool, *x) for x in inputs]
    matches = [Match.batch(g.ph_k, g.ph_v, g.pf_k, g.pf_v, g.gate_v) for g in got]
    err = 0.0
    for g, x in zip(got, inputs):
        w = anchor_distances_reference(pool, *x)
        for name in ("ph_k", "ph_v", "pf_k", "pf_v", "gate_v"):
            want = getattr(w, name)
            err = max(err, float((getattr(g, name) - want).abs().max() / want.abs().max()))
        del w
    triton_all = lambda: [anchor_distances(pool, *x) for x in inputs]  # noqa: E731
    triton_ms, syncs = timer(triton_all), count_syncs(triton_all)
    rows.append(row("distances", "triton", tokens, a, triton_ms, nbytes, copy_ms, err, syncs))
    ms = timer(lambda: [anchor_distances_reference(pool, *x) for x in inputs])
    rows.append(row("distances", "torch", tokens, a, ms, nbytes, copy_ms))
    rows.append(row("capture-distances", "triton", tokens, a, triton_ms, nbytes, copy_ms,
                    host_syncs=syncs))
    return matches


def request_weights(cached, a):
    """What a request computes from the distances cached at capture (as the planner keeps them,
    ``Match`` rows), for its first a anchors: ``planner.set_weights`` per content piece (token
    weights for the content, channel weights for the template piece after it, packed)."""
    return [set_weights(matches[:a], matches[0].ph_k.shape[0]) for matches in cached]


def bench_reuse_path(cfg, timer, pool, cos_sin, cached, rows, profile=False):
    device, dtype, a = pool.k_buffer[0].device, pool.k_buffer[0].dtype, cfg["match_anchors"]
    pieces = matching_inputs(cfg, a, dtype, device)
    read = 2 * sum(p.numel() * p.element_size() for piece in pieces for p in piece)
    rows.append(row("weights", "torch", sum(cfg["content"]), a, timer(lambda: weights_step(pieces)),
                    read, timer.copy_ms(read)))
    n = sum(cfg["content"]) + cfg["template"] * len(cfg["content"])
    for plan_a in cfg["plan_anchors"]:
        nbytes = materialize_bytes(cfg, n, plan_a, pool.k_buffer[0].element_size())

        plan_pieces = reuse_pieces(cfg, plan_a)

        weights = request_weights(cached, plan_a)

        def request():      # the planner computed the weights when the contents were captured
            materialize_triton(reuse_plan(cfg, plan_pieces, weights, device), pool, cos_sin)

        def request_with_weights():
            plan = reuse_plan(cfg, plan_pieces, request_weights(cached, plan_a), device)
            materialize_triton(plan, pool, cos_sin)

        def flatten():      # the part of the request spent on the host: plan flattening
            return reuse_plan(cfg, plan_pieces, weights, device)

        def set_weights_only():
            return request_weights(cached, plan_a)

        copy_ms = timer.copy_ms(nbytes)
        ms = timer.interleaved([request, request_with_weights, set_weights_only, flatten],
                               reps=5 * timer.reps)
        rows.append(row("reuse-path", "torch+triton", n, plan_a, ms[0], nbytes, copy_ms,
                        host_syncs=count_syncs(request)))
        rows.append(row("reuse-path+weights", "torch+triton", n, plan_a, ms[1], nbytes, copy_ms,
                        host_syncs=count_syncs(request_with_weights)))
        rows.append(row("set-weights", "torch", n, plan_a, ms[2], 0, None))
        rows.append(row("plan-flatten", "torch", n, plan_a, ms[3], 0, None,
                        host_syncs=count_syncs(flatten)))
        if profile and plan_a == cfg["plan_anchors"][0]:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                   if device.type == "cuda" else [])
            with torch_profile(activities=activities) as prof:
                for _ in range(5):
                    request()
                timer.sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    _, bv, _, ev = pieces[-1]
    gate_bytes = (a + 1) * bv.numel() * bv.element_size()
    ms = timer(lambda: entropy_gate(bv, list(ev.unbind(0)), gamma=0.3))
    rows.append(row("entropy-gate", "torch", bv.shape[1], a, ms, gate_bytes,
                    timer.copy_ms(gate_bytes)))


def print_table(rows, header=True):
    cols = (("op", "<19", None), ("backend", "<25", None), ("tokens", ">7", None),
            ("anchors", ">8", None), ("ms", ">10", ".3f"), ("GB/s", ">9", ".1f"),
            ("copy_ms", ">9", ".3f"), ("bw_frac", ">8", ".2f"), ("max_rel_err", ">12", ".2e"),
            ("host_syncs", ">11", None))
    if header:
        print("".join(format(name, align) for name, align, _ in cols))
    for r in rows:
        r = dict(r, **{"GB/s": r["bytes"] / r["ms"] / 1e6 if r["bytes"] else None,
                       "bw_frac": r["bandwidth_fraction"]})
        print("".join(format("-" if r[name] is None else
                             (format(r[name], fmt) if fmt else str(r[name])), align)
                      for name, align, fmt in cols), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results/kernels.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--flashinfer-wheel-dir", default=None)
    parser.add_argument("--skip-torch", action="store_true", help="skip the torch reference rows")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top ops of the reuse path (first plan_anchors)")
    parser.add_argument("--sweep-anchors", type=int, nargs="+", default=None,
                        help="with --sweep-blocks: sweep the materialize tiles at these anchor "
                             "counts (default: the largest) and skip the other benchmarks")
    parser.add_argument("--compare-kernel", default=None, metavar="TRITON_MATERIALIZE_PY",
                        help="also time another tree's kernel alone (rows triton-kernel-old), "
                             "interleaved with ours in this process")
    parser.add_argument("--sweep-blocks", action="store_true",
                        help="also time Triton tile sizes (materialize BLOCK_N, distances BLOCK_T, "
                             "x num_warps) on the largest shapes")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    reps, warmup = (2, 1) if args.smoke else (max(args.reps, 20), args.warmup)
    timer = Timer(device, reps, warmup)
    torch.manual_seed(0)

    backends = {"triton": materialize_triton}
    if not args.skip_torch:
        backends["torch"] = materialize_reference
    flashinfer, fi_status = (None, "skipped: CPU") if args.smoke else \
        load_flashinfer(args.flashinfer_wheel_dir)
    if flashinfer is not None:
        backends["flashinfer"] = flashinfer
    print(f"flashinfer: {fi_status}")

    n_reuse = sum(cfg["content"]) + cfg["template"] * len(cfg["content"])
    num_slots = 1 + max([n * (2 + a) for n in cfg["tokens"] for a in cfg["anchors"]]
                        + [n_reuse * (2 + cfg["match_anchors"]),
                           sum(cfg["content"]) * (1 + cfg["match_anchors"])])
    pool = make_pool(cfg, num_slots, torch.bfloat16, device)
    spec = RopeSpec.build(cfg["head_dim"], 500000.0, scaling=LLAMA3)
    cos_sin = spec.cos_sin_table(cfg["positions"], device=device)
    if "flashinfer" in backends:
        try:                                        # first call JIT-compiles FlashInfer's RoPE
            backends["flashinfer"](make_plan(cfg, 4, 1, device), pool, cos_sin)
        except Exception as exc:  # noqa: BLE001
            fi_status = f"unavailable: {type(exc).__name__}: {exc}"
            del backends["flashinfer"]
            print(f"flashinfer: {fi_status}")
    rows = []
    old_kernel = (load_module(args.compare_kernel, "old_triton_materialize")
                  if args.compare_kernel else None)
    if args.sweep_blocks and args.sweep_anchors:
        sweep_triton_blocks(cfg, timer, pool, cos_sin, rows, args.sweep_anchors, distances=False,
                            old_kernel=old_kernel)
    else:
        bench_materialize(cfg, timer, pool, cos_sin, backends, rows, old_kernel)
        if device.type == "cuda":
            bench_call_phases(cfg, timer, pool, cos_sin, rows)
        if args.sweep_blocks:
            sweep_triton_blocks(cfg, timer, pool, cos_sin, rows, old_kernel=old_kernel)
        cached = bench_distances(cfg, timer, pool, rows)
        bench_reuse_path(cfg, timer, pool, cos_sin, cached, rows, args.profile)
        print_table(rows)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    result = dict(device=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  flashinfer=fi_status, shapes={k: v for k, v in cfg.items()}, reps=reps,
                  rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
