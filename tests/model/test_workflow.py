"""The KVCOMM core on real activations (SmolLM2-135M): spec T4, T9 and the workflow modes."""

import math

import pytest
import torch

from kvcomm_sglang.metrics import relative_error
from kvcomm_sglang.planner import Fallback, ReusePlan
from tests.harness import workflow
from tests.harness.runner import WorkflowRunner

pytestmark = pytest.mark.model
NUM_QUESTIONS = 3


@pytest.fixture(scope="module")
def runs(hf):
    out = {}
    for mode in ("kvcomm", "position_only"):
        runner = WorkflowRunner(hf, mode, max_new_tokens=8)
        calls = [c for i in range(NUM_QUESTIONS)
                 for c in runner.run_question(i, workflow.QUESTIONS[i])]
        out[mode] = (runner, calls)
    return out


def test_kvcomm_learns_online_then_reuses(runs):
    runner, calls = runs["kvcomm"]
    first = [c for c in calls if c.question < 2]
    assert all(c.served == "dense" and c.fallback_reason.startswith("new_anchor") for c in first)
    reused = [c for c in calls if c.served == "reuse"]
    assert reused, "no call was served by reuse after two questions of warm-up"
    assert runner.stats.reused_calls == len(reused)
    for c in reused:
        assert c.reused_tokens == c.prompt_tokens - runner.state.templates[str(c.agent)].pieces[0].length - 1


def test_anchors_beat_position_only_on_the_same_calls(runs):
    kv_calls = {(c.question, c.agent): c for c in runs["kvcomm"][1] if c.served == "reuse"}
    po_calls = {(c.question, c.agent): c for c in runs["position_only"][1]}
    kv = sum(c.kv_rel_error for c in kv_calls.values()) / len(kv_calls)
    po = sum(po_calls[k].kv_rel_error for k in kv_calls) / len(kv_calls)
    assert kv < po, f"kvcomm KV error {kv:.4f} is not below position-only's {po:.4f}"


def test_t9_entropy_gate_on_real_activations(runs):
    runner, _ = runs["kvcomm"]
    gates = [c.gate for c in runner.state.contents.values()]
    measured = [g for g in gates if not math.isnan(g.entropy)]
    assert measured, "no prediction ran the entropy test"
    for g in measured:
        assert 0.0 <= g.entropy <= 1.0 + 1e-9
        if g.reason in ("reusable", "ambiguous"):
            assert (g.entropy > runner.state.config.gamma) == g.is_new_anchor
            assert math.isclose(sum(g.probs), 1.0, rel_tol=1e-6)
    for g in gates:
        if g.reason == "too_few_anchors":
            assert g.is_new_anchor and len(g.available) < runner.state.config.min_anchors


def test_t4_repeated_message(hf, runs):
    state = runs["kvcomm"][0].state
    base = workflow.question_base(workflow.QUESTIONS[0], hf.encode)   # message m, seen at q0
    out = hf.prefill(base.ids)
    content = state.register_content("user_question", base.content_ids, out.k[:, base.drop:],
                                     out.v[:, base.drop:], torch.arange(base.drop, len(base.ids)))
    assert not content.gate.is_new_anchor
    needed = {"user_question": content.key}
    plan = state.plan("0", needed)
    assert isinstance(plan, ReusePlan), plan
    piece, template = plan.pieces
    m = [a.key for a in piece.anchors].index(content.key)
    # m's own anchor is at distance 0: it dominates every (layer, head, channel) prefix weight
    assert torch.all(template.weights_k.argmax(0) == m) and torch.all(template.weights_v.argmax(0) == m)
    assert float(piece.weights_k[m].min()) < 0.99      # placeholder weights stay soft
    k, v = state.assemble("0", needed, plan)
    base_k, base_v = state.assemble("0", needed)
    real = hf.prefill(plan.layout.token_ids)
    x = template.start
    # the template piece after m gets mostly m's own deviation: far closer than rotation alone
    for ours, rotated_only, real_kv in ((k, base_k, real.k), (v, base_v, real.v)):
        assert relative_error(ours[:, x:], real_kv[:, x:]) < \
            0.5 * relative_error(rotated_only[:, x:], real_kv[:, x:])
    # the content is corrected by a soft mix: better than rotation alone, not exact
    s = slice(piece.start, piece.start + piece.source.length)
    for layer in range(1, k.shape[0]):
        err = relative_error(k[layer:layer + 1, s], real.k[layer:layer + 1, s], 0)
        pos_only = relative_error(base_k[layer:layer + 1, s], real.k[layer:layer + 1, s], 0)
        assert 0 < err < pos_only
