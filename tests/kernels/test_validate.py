"""The device-side plan validator (CUDA fast path of check_plan) against check_plan's verdicts."""

import pytest
import torch

from kvcomm_sglang.kernels.plan import MaterializePlan
from kvcomm_sglang.kernels import validate
from kvcomm_sglang.kernels.validate import count_violations
from tests.kernels.conftest import DEVICE


def plan_of(dst, src, pos, group, dev):
    n, a = len(dst), (len(dev[0]) if dev else 0)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    dev_t = t(dev) if a else torch.full((n, 0), -1, dtype=torch.long)
    return MaterializePlan(t(dst), t(src), t(pos), dev_t, torch.rand(n, a), torch.rand(n, a),
                           t(group), torch.zeros(1, a, 1, 1, 1), torch.zeros(1, a, 1, 1, 1))


CASES = [
    ("ok", plan_of([5, 6, 7], [1, 2, 3], [0, 1, 2], [-1, 0, -1], [[8, -1], [9, 10], [-1, -1]]), 0),
    ("no anchors", plan_of([5, 6], [1, 2], [0, 1], [-1, -1], []), 0),
    ("dst out of range", plan_of([5, 99], [1, 2], [0, 1], [-1, -1], []), 1),
    ("negative src", plan_of([5, 6], [-1, 2], [0, 1], [-1, -1], []), 1),
    ("position beyond table", plan_of([5, 6], [1, 2], [0, 40], [-1, -1], []), 1),
    ("group beyond channel rows", plan_of([5, 6], [1, 2], [0, 1], [-1, 1], []), 1),
    ("dev out of range", plan_of([5, 6], [1, 2], [0, 1], [-1, -1], [[-2], [3]]), 1),
    ("duplicate dst", plan_of([5, 5, 6], [1, 2, 3], [0, 1, 2], [-1, -1, -1], []), 1),
    ("dst overlaps src", plan_of([5, 6], [6, 2], [0, 1], [-1, -1], []), 1),
    ("dst overlaps dev", plan_of([5, 6], [1, 2], [0, 1], [-1, -1], [[-1], [5]]), 1),
    # more anchors than the validator's anchor step (8): the problems sit past the first step
    ("10 anchors ok", plan_of([5, 6], [1, 2], [0, 1], [-1, -1], [list(range(10, 20))] * 2), 0),
    ("10 anchors, 10th out of range",
     plan_of([5, 6], [1, 2], [0, 1], [-1, -1], [list(range(10, 19)) + [32]] * 2), 2),
    ("10 anchors, 9th overlaps dst",
     plan_of([5, 6], [1, 2], [0, 1], [-1, -1], [list(range(10, 18)) + [6, 19]] * 2), 2),
]


@pytest.mark.parametrize("name,plan,expected", CASES, ids=[c[0] for c in CASES])
def test_count_violations(name, plan, expected):
    got = count_violations(plan.to(DEVICE), num_slots=32, num_positions=16, num_groups=1)
    assert int(got) == expected


def test_stamps_of_earlier_plans_are_not_this_plans():
    """The slot table keeps earlier plans' stamps: a plan reading slots that the previous plan
    wrote is fine, and each plan still finds its own duplicates and overlaps."""
    first = plan_of([5, 6], [1, 2], [0, 1], [-1, -1], [])
    reads_first = plan_of([7, 8], [5, 6], [0, 1], [-1, -1], [[5], [6]])
    writes_first_again = plan_of([5, 6], [7, 8], [0, 1], [-1, -1], [])
    for plan in (first, reads_first, writes_first_again):
        assert int(count_violations(plan.to(DEVICE), 32, 16, 1)) == 0
    again_dup = plan_of([5, 5], [1, 2], [0, 1], [-1, -1], [])
    assert int(count_violations(again_dup.to(DEVICE), 32, 16, 1)) == 1


def test_epoch_wrap_clears_the_table(monkeypatch):
    """When the epoch counter reaches its limit the slot table starts over from zeros, so a
    stamp left before the wrap never matches an epoch after it."""
    monkeypatch.setattr(validate, "_stamps", {})
    monkeypatch.setattr(validate, "EPOCH_LIMIT", 3)
    plans = [plan_of([5, 6], [1, 2], [0, 1], [-1, -1], []),            # epoch 1
             plan_of([9], [3], [0], [-1], []),                          # epoch 2
             plan_of([10], [4], [0], [-1], []),                         # epoch 3
             plan_of([11], [5], [0], [-1], [])]                         # wraps: epoch 1 again
    counts = [int(count_violations(p.to(DEVICE), 32, 16, 1)) for p in plans]
    assert counts == [0, 0, 0, 0]                # slot 5, stamped in epoch 1, is not this plan's
    (stamps, epoch), = validate._stamps.values()
    assert epoch == 1 and stamps.count_nonzero().item() == 1
