"""AgentGraph on the real CPU kvcomm server: four topologies, two rounds, measured RunResult."""

import pytest

from kvcomm_sglang.frontend import KVCommEndpoint
from kvcomm_sglang.frontend.agents import Agent, AgentGraph, TOPOLOGIES
from tests.harness.workflow import QUESTIONS

AGENTS = [Agent("solver", "You are a careful solver."),
          Agent("checker", "You are a strict checker.")]


@pytest.fixture(scope="module")
def endpoint(kvcomm_server):
    return KVCommEndpoint(kvcomm_server.url)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_two_rounds_fill_the_run_result(endpoint, topology):
    graph = AgentGraph(AGENTS, topology=topology, rounds=2, max_tokens=8)
    result = graph.run(QUESTIONS[0], endpoint)
    assert len(result.answers) == len(result.calls) == 4
    assert [c.round for c in result.calls] == [1, 1, 2, 2]
    expected = ["checker", "solver"] if topology == "star" else ["solver", "checker"]
    assert [c.agent for c in result.calls] == expected * 2
    for call, answer in zip(result.calls, result.answers):
        assert call.text == answer and answer
        assert call.mode in ("reuse", "dense") and call.ttft_s > 0
        assert call.prompt_tokens > 10 and call.reused_tokens == 0     # first question: warm-up
        # dense with a reason, or "reuse" of a prompt SGLang's radix tree already holds exactly
        # (a round-2 prompt equal to round 1's when an answer repeats)
        assert call.fallback_reason or call.mode == "reuse"
    if topology in ("debate", "full"):       # round 2 sees round-1 answers as history
        assert "Your previous answer" in graph.user_template(0, 1)


def test_debate_reuses_after_warmup_and_dense_mode_is_plain(endpoint):
    graph = AgentGraph(AGENTS, topology="debate", rounds=2, max_tokens=8)
    runs = [graph.run(q, endpoint) for q in QUESTIONS[1:6]]
    calls = [c for run in runs[2:] for c in run.calls]
    reused = [c for c in calls if c.mode == "reuse"]
    assert reused, [(c.agent, c.round, c.fallback_reason) for c in calls]
    assert all(0 < c.reused_tokens < c.prompt_tokens for c in reused)
    # the first question warms the anchors; the first call that holds it computes it
    assert all(c.mode == "dense" and c.fallback_reason.startswith(("new_anchor", "unknown_message"))
               for c in runs[0].calls)
    dense = graph.run(QUESTIONS[1], endpoint, mode="dense")
    assert all(c.mode == "dense" and c.fallback_reason is None for c in dense.calls)
    assert len(dense.answers) == len(runs[0].answers) and all(dense.answers)
    # (no answer-equality check: a dense fallback and a plain request can split prefill at
    # different cached prefixes, and bf16 prefill then may change a greedy token, as in SGLang)


def test_misuse_raises_value_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="use one of full, chain, star, debate"):
        AgentGraph(AGENTS, topology="ring")
    with pytest.raises(ValueError, match="names no agent.*add Agent"):
        AgentGraph(AGENTS + [Agent("judge", "Judge.", "Decide: {agent_bob_current}")])
    with pytest.raises(ValueError, match="use {agent_judge_history}"):
        AgentGraph([Agent("judge", "J.", "{user_question}"),
                    Agent("a", "A.", "Earlier: {agent_judge_current}")][::-1])
    with pytest.raises(ValueError, match="letters or digits"):
        Agent("bad_name", "x")
    with pytest.raises(ValueError, match="rounds"):
        AgentGraph(AGENTS, rounds=0)
