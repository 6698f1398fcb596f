"""check_plan: metadata on the host, every data-dependent check in one device read; and
from_reuse_plan: where each weight comes from, and how many torch calls a plan costs."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvcomm_sglang.kernels import MaterializePlan, check_plan
from kvcomm_sglang.kernels.plan import from_reuse_plan, read_range_stats
from kvcomm_sglang.planner import PiecePlan, unpack
from tests.kernels.test_materialize import make_case
from tests.torch_calls import TorchCalls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n_tokens,n_anchors", [(7, 2), (33, 0)])
def test_check_plan_reads_the_device_once(n_tokens, n_anchors):
    plan, pool, cos_sin = make_case(n_tokens, n_anchors)
    with TorchCalls() as reads:
        check_plan(plan, pool, cos_sin)
    assert reads.host_reads == ["tolist"]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                check_plan(plan, pool, cos_sin)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
        assert len(syncs) == 1, [f"{w.filename}:{w.lineno}: {w.message}" for w in syncs]


def test_check_plan_empty_plan_reads_nothing():
    plan, pool, cos_sin = make_case(7, 2)
    empty = MaterializePlan(*(getattr(plan, f)[:0] for f in ("dst_slots", "src_slots",
                            "positions", "dev_slots", "token_wk", "token_wv", "group")),
                            plan.channel_wk, plan.channel_wv)
    with TorchCalls() as reads:
        check_plan(empty, pool, cos_sin)
    assert reads.host_reads == []


def test_first_failing_check_wins():
    """A plan both out of range and overlapping reports the range (checked first)."""
    plan, pool, cos_sin = make_case(7, 2)
    num_slots = pool.k_buffer[0].shape[0]
    bad = MaterializePlan(**{**plan.__dict__, "src_slots": plan.dst_slots.roll(1),
                             "positions": plan.positions + 10_000})
    with pytest.raises(ValueError, match="positions has values"):
        check_plan(bad, pool, cos_sin)
    bad = MaterializePlan(**{**plan.__dict__, "src_slots": plan.dst_slots.roll(1),
                             "dst_slots": plan.dst_slots.clone().fill_(num_slots + 3)})
    with pytest.raises(ValueError, match=r"dst_slots has values in \[\d+, \d+\], allowed"):
        check_plan(bad, pool, cos_sin)


def test_read_range_stats_returns_extras_and_names_the_range():
    t = torch.tensor([3, 9], device=DEVICE, dtype=torch.int32)
    extra = torch.tensor(7, device=DEVICE)
    assert read_range_stats([("t", t, 0, 10)], (extra,)) == [7]
    with pytest.raises(ValueError, match=r"t has values in \[3, 9\], allowed \[4, 10\)"):
        read_range_stats([("t", t, 4, 10)])


def test_from_reuse_plan_places_packed_weights_and_pads_anchors():
    """Pieces with 3 and 1 anchors (padded to 3), a piece without anchors, a row range that cuts
    the first and the last piece: every weight equals the packed entry it must come from."""
    L, H, D = 2, 2, 4
    lhd, gen = L * H * D, torch.Generator().manual_seed(1)
    slot = iter(range(1, 10_000))

    def block(n):
        return SimpleNamespace(length=n, positions=torch.zeros(n, dtype=torch.long),
                               slots=torch.tensor([next(slot) for _ in range(n)]))

    def packed(a, t):
        return torch.rand(a, 2 * t + 2 * lhd, generator=gen).softmax(0).to(DEVICE)

    def anchors(a, n):
        return [SimpleNamespace(deviations={"c": SimpleNamespace(content=block(n),
                                                                template=block(n))})
                for _ in range(a)]

    p1, p2 = packed(3, 5), packed(1, 4)
    pieces, start = [], 0
    for kind, n, a, p in (("content", 5, 3, p1), ("template", 3, 3, p1), ("template", 2, 0, None),
                          ("content", 4, 1, p2), ("template", 3, 1, p2)):
        w = None if p is None else unpack(p, (p.shape[1] - 2 * lhd) // 2, (L, H, D))
        wk, wv = (None, None) if w is None else ((w[0], w[1]) if kind == "content" else (w[2], w[3]))
        pieces.append(PiecePlan(kind, "x", block(n), start, anchors(a, n), wk, wv, p))
        start += n

    lo, hi = 2, start - 1
    dst = torch.arange(100, 100 + hi - lo, device=DEVICE)
    plan = from_reuse_plan(SimpleNamespace(consumer="c", pieces=pieces), dst, _slots_of, L, H, D,
                           rows=(lo, hi))
    assert plan.positions.tolist() == list(range(lo, hi))
    wk, wv = plan.token_wk.cpu(), plan.token_wv.cpu()
    for row, position in enumerate(range(lo, hi)):
        piece = next(p for p in pieces if p.start <= position < p.start + p.source.length)
        i, a = position - piece.start, len(piece.anchors)
        assert torch.all(wk[row, a:] == 0) and torch.all(wv[row, a:] == 0)     # padding
        if piece.kind == "content":
            t = (piece.packed.shape[1] - 2 * lhd) // 2
            assert torch.equal(wk[row, :a], piece.packed[:, i].cpu())
            assert torch.equal(wv[row, :a], piece.packed[:, t + i].cpu())
            assert int(plan.group[row]) == -1
        else:
            assert torch.all(wk[row] == 0) and torch.all(wv[row] == 0)
        deviations = [_slots_of((x, "c", piece.kind))[i] for x in piece.anchors]
        assert plan.dev_slots[row].tolist() == deviations + [-1] * (3 - a)
    groups = plan.group.cpu()
    assert sorted(set(groups.tolist()) - {-1}) == [0, 1]
    for g, piece in enumerate(p for p in pieces if p.kind == "template" and p.anchors):
        a, t = len(piece.anchors), (piece.packed.shape[1] - 2 * lhd) // 2
        want_k = piece.packed[:, 2 * t:2 * t + lhd].reshape(a, L, H, D).cpu()
        want_v = piece.packed[:, 2 * t + lhd:].reshape(a, L, H, D).cpu()
        assert torch.equal(plan.channel_wk[g, :a].cpu(), want_k)
        assert torch.equal(plan.channel_wv[g, :a].cpu(), want_v)
        assert torch.all(plan.channel_wk[g, a:] == 0) and torch.all(plan.channel_wv[g, a:] == 0)
    gap = pieces[:2] + pieces[3:]                 # positions must run on from piece to piece
    with pytest.raises(ValueError, match="contiguous in prompt order"):
        from_reuse_plan(SimpleNamespace(consumer="c", pieces=gap), dst[:hi - lo - 2], _slots_of,
                        L, H, D, rows=(lo, hi))
    with pytest.raises(ValueError, match="needs fp32 packed weights"):
        pieces[0].packed = None
        from_reuse_plan(SimpleNamespace(consumer="c", pieces=pieces), dst, _slots_of, L, H, D,
                        rows=(lo, hi))


@pytest.mark.parametrize("pairs", [2, 8])
def test_from_reuse_plan_torch_calls_do_not_grow_per_row_or_piece(pairs):
    """The host cost of a plan on a GPU is its number of torch calls that dispatch or launch
    (property reads such as ``.shape`` are not counted): per piece only numpy work, per distinct
    weight table one view, plus a fixed handful (copy, split, concatenation, gathers)."""
    L, H, D, a = 2, 2, 4, 3
    lhd, slot = L * H * D, iter(range(1, 100_000))

    def block(n):
        return SimpleNamespace(length=n, derotated=True,
                               slots=np.array([next(slot) for _ in range(n)]))

    pieces, start = [], 0
    for _ in range(pairs):
        packed = torch.rand(a, 2 * 50 + 2 * lhd).to(DEVICE)
        anchors = [SimpleNamespace(deviations={"c": SimpleNamespace(content=block(50),
                                                                   template=block(6))})
                   for _ in range(a)]
        for kind, n in (("content", 50), ("template", 6)):
            pieces.append(PiecePlan(kind, "x", block(n), start, anchors, None, None, packed))
            start += n

    dst = torch.arange(200_000, 200_000 + start, device=DEVICE)
    reuse = SimpleNamespace(consumer="c", pieces=pieces)
    from_reuse_plan(reuse, dst, _slots_of, L, H, D)         # first call: cached constants
    with TorchCalls() as calls:
        from_reuse_plan(reuse, dst, _slots_of, L, H, D)
    dispatched = calls.dispatched
    # 12 + pairs (one view per weight table); CUDA's pinned staging adds 5 (measured on an
    # H200): numel, slice, numpy in ``take``, slice and the non-blocking ``to`` in ``send``.
    # A per-piece torch call would add 2 * pairs; a transpose on the device, 2.
    staging = 5 if DEVICE == "cuda" else 0
    assert len(dispatched) <= 12 + pairs + staging, dispatched


def _slots_of(source):
    """``from_reuse_plan``'s slots_of for the hand-made blocks above (numpy or CPU tensors)."""
    if isinstance(source, tuple):
        anchor, consumer, kind = source
        source = getattr(anchor.deviations[consumer], kind)
    return source.slots
