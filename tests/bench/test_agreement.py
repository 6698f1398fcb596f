"""The quality harness's measures (tests/harness/agreement.py), the judge's pick, and the
position-only baseline the server agreement benchmark runs (``KVCommConfig.position_only``)."""

import pytest
import torch

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.planner import ReusePlan
from tests.core.synthetic import TEMPLATES, World
from tests.core.test_planner import run_request
from tests.harness import agreement, workflow
from tests.harness.runner import ABLATIONS, ablate


def test_compare_scores_tokens_verdict_and_judge():
    row = agreement.compare([1, 2, 3], [1, 2, 4], ("it is 8", "eight"), "8", judge=False)
    assert row == {"first_token_agreement": True, "first8_agreement": False,
                   "answer_agreement": False, "verdict_agreement": False}
    row = agreement.compare([5], [6], ("Agent 1.", "1"), "", judge=True, pick=workflow.judge_pick)
    assert row["judge_consistency"] and not row["first_token_agreement"]
    assert "verdict_agreement" not in row


@pytest.mark.parametrize("text, pick", [("Agent 0 is right", "0"), ("1", "1"),
                                        ("Answer 10 or 21", "none"), ("neither", "none")])
def test_judge_pick(text, pick):
    assert workflow.judge_pick(text) == pick


def test_bootstrap_interval_is_deterministic_and_brackets_the_share():
    values = [True] * 30 + [False] * 10
    lo, hi = agreement.bootstrap_ci(values)
    assert agreement.bootstrap_ci(values) == [lo, hi]
    assert lo < 0.75 < hi and 0.55 < lo and hi < 0.9
    wide = agreement.bootstrap_ci([True] * 3 + [False])
    assert wide[1] - wide[0] > hi - lo
    assert agreement.bootstrap_ci([True] * 5) == [1.0, 1.0]
    assert agreement.bootstrap_ci([]) is None


def test_summarize_counts_judge_calls_apart():
    rows = [agreement.compare([1], [1], ("8", "8"), "8", judge=False),
            agreement.compare([1], [2], ("0", "1"), "", judge=True, pick=workflow.judge_pick)]
    out = agreement.summarize(rows)
    assert out["same_calls"] == 2 and out["judge_calls"] == 1
    assert out["first_token_agreement"] == 0.5 and out["verdict_agreement"] == 1.0
    assert out["judge_consistency"] == 0.0 and out["ci95"]["judge_consistency"] == [0.0, 0.0]


def test_paired_difference_on_shared_calls():
    mine = [{"call": i, "x": True} for i in range(4)]
    theirs = [{"call": i, "x": i < 2} for i in range(6)]
    out = agreement.paired_difference(mine, theirs, "x")
    assert out["calls"] == 4 and out["difference"] == 0.5


def test_judge_template_reads_the_solver_and_the_checker():
    templates = workflow.agent_templates(lambda system, user: system + "|" + user,
                                         lambda text: [ord(c) for c in text], judge=True)
    assert [t.agent for t in templates] == ["0", "1", "2", "3"]
    assert templates[-1].placeholders == ("user_question", "agent_0_current", "agent_1_current")


def test_position_only_reuses_without_anchors_and_only_rotates():
    world = World(KVCommConfig(position_only=True))     # no anchor learned yet
    q = world.content("user_question", 9)
    a0 = world.content("agent_0_current", 6)
    a1 = world.content("agent_1_current", 7)
    needed = {"user_question": q.key, "agent_0_current": a0.key, "agent_1_current": a1.key}
    needed = {ph: needed[ph] for ph in TEMPLATES["2"][1]}
    plan = world.state.plan("2", needed)
    assert isinstance(plan, ReusePlan) and all(not p.anchors for p in plan.pieces)
    k, v = world.state.assemble("2", needed, plan)
    k0, v0 = world.state.assemble("2", needed)
    assert torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_zeroes_one_part_of_the_correction(ablation):
    world = World()
    keys = {}
    for _ in range(3):                       # anchors learned by dense runs
        keys, _ = run_request(world)
    needed = {ph: keys[ph] for ph in TEMPLATES["2"][1]}
    plan = world.state.plan("2", needed)
    assert isinstance(plan, ReusePlan)
    cached = [p.weights_k.clone() for p in plan.pieces if p.anchors]
    full = world.state.assemble("2", needed, plan)
    none = world.state.assemble("2", needed)
    assert not torch.equal(full[0], none[0]) and not torch.equal(full[1], none[1])
    k, v = world.state.assemble("2", needed, ablate(plan, ablation))
    layout = plan.layout
    for piece in layout.pieces[1:]:
        span = slice(piece.start, piece.start + piece.length)
        kind_off = {"no_template_correction": "template",
                    "no_content_correction": "content"}.get(ablation, piece.kind)
        off_k = ablation != "no_value_correction" and piece.kind == kind_off
        off_v = ablation != "no_key_correction" and piece.kind == kind_off
        assert torch.equal(k[:, span], (none if off_k else full)[0][:, span])
        assert torch.equal(v[:, span], (none if off_v else full)[1][:, span])
    assert all(torch.equal(a, p.weights_k) for a, p in zip(cached, [p for p in plan.pieces
                                                                   if p.anchors]))
