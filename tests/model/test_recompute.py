"""The oracle's recompute options (tests/harness/recompute.py) on the real model, and that the
runner reads them and the config's recompute lengths."""

import json

import pytest
import torch

from kvcomm_sglang.config import KVCommConfig
from tests.harness import workflow
from tests.harness.recompute import largest_offsets, refresh, runs, sink_positions
from tests.harness.runner import WorkflowRunner

pytestmark = pytest.mark.model


def test_runs_groups_consecutive_positions():
    assert runs([]) == []
    assert runs([2, 3, 4, 7, 9, 10]) == [(2, 5), (7, 8), (9, 11)]


@pytest.mark.parametrize("seed", [0, 1])
def test_refresh_recomputes_exactly_the_chosen_tokens(hf, seed):
    """Exact KV with random garbage at some positions: refreshing them gives the dense KV back
    (everything before each chosen token is exact), and leaves the other tokens alone."""
    gen = torch.Generator().manual_seed(seed)
    ids = hf.encode(workflow.QUESTIONS[seed] + " " + workflow.QUESTIONS[seed + 5])
    exact = hf.prefill(ids)
    chosen = sorted(set(torch.randint(1, len(ids), (5,), generator=gen).tolist()))
    k, v = exact.k.clone(), exact.v.clone()
    k[:, chosen] = torch.randn(k[:, chosen].shape, generator=gen)
    v[:, chosen] = torch.randn(v[:, chosen].shape, generator=gen)
    rk, rv = refresh(hf, ids, k, v, chosen)
    assert torch.allclose(rk, exact.k, atol=1e-4) and torch.allclose(rv, exact.v, atol=1e-4)
    assert torch.equal(k[:, chosen[0] - 1], rk[:, chosen[0] - 1])


def test_largest_offsets_finds_planted_tokens():
    gen = torch.Generator().manual_seed(3)
    plain = tuple(torch.randn(3, 20, 2, 8, generator=gen) for _ in range(2))
    corrected = tuple(x + 1e-3 * torch.randn(x.shape, generator=gen) for x in plain)
    corrected[1][1:, [6, 15]] += 5.0
    corrected[0][0, 9] += 50.0                  # layer 0 is never corrected: not counted
    assert largest_offsets(corrected, plain, 4, 18, 2) == [6, 15]
    assert largest_offsets(corrected, plain, 4, 10, 1) == [6]


def test_sink_positions_are_the_first_tokens_of_each_piece(hf):
    template = workflow.agent_templates(hf.render_chat, hf.encode)[1]
    runner = WorkflowRunner(hf, "position_only", max_new_tokens=1)
    q = runner.state.register_content("user_question", [10, 11, 12], torch.zeros(30, 3, 3, 64),
                                      torch.zeros(30, 3, 3, 64), torch.arange(3))
    a = runner.state.register_content("agent_0_current", [13, 14], torch.zeros(30, 2, 3, 64),
                                      torch.zeros(30, 2, 3, 64), torch.arange(2))
    layout = runner.state.layout(template.agent, {"user_question": q.key,
                                                  "agent_0_current": a.key})
    got = sink_positions(layout, 2, layout.total_length)
    want = [p for piece in layout.pieces[1:] for p in range(piece.start, piece.start +
                                                             min(2, piece.length))]
    assert got == want and layout.pieces[0].start not in got
    assert max(sink_positions(layout, 2, layout.pieces[2].start)) < layout.pieces[2].start


@pytest.mark.parametrize("options", [{"sink": 3}, {"selective": 5},
                                     {"config": KVCommConfig(recompute_last=6)}])
def test_runner_reads_the_recompute_options(hf, options):
    """Reused tokens drop by what each option recomputes: the options are read."""
    runner = WorkflowRunner(hf, "position_only", max_new_tokens=4, **options)
    calls = runner.run_question(0, workflow.QUESTIONS[0])
    for c in calls:
        template = runner.state.templates[str(c.agent)]
        layout = runner.state.layout(str(c.agent), {ph: runner.last_keys[ph]
                                                    for ph in template.placeholders})
        end = layout.total_length - 1
        count = {"sink": len(sink_positions(layout, 3, end)), "selective": 5,
                 "config": 5}[next(iter(options))]
        assert c.reused_tokens == c.prompt_tokens - layout.prefix_length - 1 - count


def quality_bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def test_quality_runs_parse_counts_and_combinations():
    """benchmarks/quality.py: ``sink_N``, ``selective_N`` and ``a+b`` runs are built, not
    looked up, so every count and combination the ablation table names can be rerun."""
    quality = quality_bench()
    assert quality.spec_of("sink_4") == {"mode": "kvcomm", "sink": 4}
    assert quality.spec_of("kvcomm_gamma1+selective_16") == {
        "mode": "kvcomm", "selective": 16, "config": {"gamma": 1.0}}
    assert quality.spec_of("kvcomm_gamma1+nope") is None and quality.spec_of("gate_1") is None


def test_quality_merge_joins_modes_and_pairs_them_on_the_same_calls(tmp_path):
    quality = quality_bench()

    def part(name, agree, questions=2):
        rows = [{"call": f"{i}.0", "served": "reuse", "first_token_agreement": a,
                 "first8_agreement": a, "answer_agreement": a} for i, a in enumerate(agree)]
        path = tmp_path / f"{name}{questions}.json"
        path.write_text(json.dumps({"questions": questions, "new_tokens": 4,
                                    "modes": {name: {"same_calls": len(rows)}},
                                    "calls": {name: rows}}))
        return str(path)

    merged = quality.merge([part("kvcomm", [True, True]), part("position_only", [True, False])])
    assert set(merged["modes"]) == {"kvcomm", "position_only"}
    diff = merged["paired_position_only"]["kvcomm_minus_position_only"]["answer_agreement"]
    assert diff["calls"] == 2 and diff["difference"] == 0.5
    with pytest.raises(ValueError, match="cannot merge"):
        quality.merge([part("kvcomm", [True]), part("naive", [True], questions=3)])
