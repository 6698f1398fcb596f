"""check_plan: metadata on the host, every data-dependent check in one device read."""

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kvcomm_sglang.kernels import MaterializePlan, check_plan
from kvcomm_sglang.kernels.plan import read_range_stats
from tests.kernels.test_materialize import make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Torch calls that read device data back to the host (or size outputs by it).
SYNCING = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "unique",
           "nonzero", "bincount", "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts syncing torch calls (and boolean-mask indexing) made inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        is_mask = name == "__getitem__" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in SYNCING or is_mask:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_tokens,n_anchors", [(7, 2), (33, 0)])
def test_check_plan_reads_the_device_once(n_tokens, n_anchors):
    plan, pool, cos_sin = make_case(n_tokens, n_anchors)
    with HostReads() as reads:
        check_plan(plan, pool, cos_sin)
    assert reads.calls == ["tolist"]
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
    with HostReads() as reads:
        check_plan(empty, pool, cos_sin)
    assert reads.calls == []


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
