"""``python -m kvcomm_sglang.frontend.demo``: a 4-agent debate, dense vs KVCOMM, on the CPU server.

Starts ``kvcomm-sglang serve --device cpu`` with the bundled default model (or uses ``--url``),
runs the debate on a few built-in questions densely and then with KVCOMM (after warm-up
questions that fill the anchor pools), and prints per-agent TTFT (dense, KVCOMM, ratio),
agent-level and token-level reuse rates, and answer agreement: per reused call with dense's
answer to the very same prompt (sent again without KVCOMM; 95 % Wilson interval), and end to
end (a changed answer changes every later prompt). The server stops on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

from tqdm import tqdm

from kvcomm_sglang.frontend import scope
from kvcomm_sglang.frontend.agents import Agent, AgentGraph, _agent_program, _fill
from kvcomm_sglang.frontend.endpoint import KVCommEndpoint

QUESTIONS = (
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara had 12 candies and gave 4 to her friend. How many candies are left?",
    "A box holds 6 eggs. How many eggs are in 4 boxes?",
    "A pencil costs 2 dollars. How much do 7 pencils cost?",
    "A rope 15 meters long is cut into 3 equal pieces. How long is each piece?",
    "Lisa reads 10 pages a day. How many pages does she read in 6 days?",
    "A bus has 30 seats and 18 are taken. How many seats are free?",
    "A farmer has 4 cows. How many legs do the cows have together?",
    "There are 20 students and half of them wear glasses. How many wear glasses?",
    "A shop sells 9 shirts on Monday and 11 on Tuesday. How many shirts is that in total?",
    "You have 2 quarters and 3 dimes. How many cents is that?",
)
DEBATERS = (
    Agent("alice", "You are Alice, a careful math student. Solve the problem step by step."),
    Agent("bob", "You are Bob, a skeptical reviewer. Look for mistakes before answering."),
    Agent("carol", "You are Carol, a teacher. Explain the answer simply."),
    Agent("dave", "You are Dave, a quick thinker. Give the final number first."),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running kvcomm server (default: start a CPU server)")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=6, help="questions that fill the anchors")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.warmup + args.questions > len(QUESTIONS):
        parser.error(f"warmup + questions must be at most {len(QUESTIONS)}")
    if args.url:
        return run(args, args.url)
    from kvcomm_sglang.runtime_patch.process import ServerProcess

    print("starting the CPU server (kvcomm-sglang serve --device cpu) ...", flush=True)
    try:
        with ServerProcess(["--device", "cpu"]) as server:
            return run(args, server.url)
    except KeyboardInterrupt:
        print("\ninterrupted; the server was stopped", file=sys.stderr)
        return 130


def run(args, url: str) -> int:
    endpoint = KVCommEndpoint(url)
    graph = AgentGraph(DEBATERS, topology="debate", rounds=args.rounds, max_tokens=args.max_tokens)
    warm = QUESTIONS[:args.warmup]
    measured = QUESTIONS[args.warmup:args.warmup + args.questions]
    plan = [("dense", q) for q in measured] + [("kvcomm", q) for q in warm + measured]
    results = {"dense": [], "kvcomm": []}
    for mode, question in tqdm(plan, desc="debates", unit="run"):
        result = graph.run(question, endpoint, mode=mode)
        if mode == "dense" or question in measured:
            results[mode].append(result)
    same = same_prompt_answers(graph, results["kvcomm"], endpoint)
    print(report(results["dense"], results["kvcomm"], args, same))
    return 0


def same_prompt_answers(graph: AgentGraph, runs, endpoint) -> list[str]:
    """Dense's answer to every KVCOMM call's own prompt (rebuilt from that run's answers), in
    call order: a difference belongs to that call."""
    dense = scope.Workflow("demo-same-prompts", "dense")
    out = []
    with scope.use(dense):
        for result in runs:
            answers, texts = {}, iter(result.answers)
            for round_ in range(graph.rounds):
                previous, answers = answers, {}
                for agent in graph.order():
                    user = _fill(graph.user_template(graph.agents.index(agent), round_),
                                 result.question, answers, previous)
                    state = _agent_program.run(question=result.question, system=agent.system,
                                               user=user, max_tokens=graph.max_tokens,
                                               backend=endpoint)
                    out.append(state["answer"])
                    answers[agent.name] = next(texts)
    return out


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a share hits / n."""
    if n == 0:
        return 0.0, 1.0
    p, d = hits / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def report(dense, kvcomm, args, same: list[str]) -> str:
    calls_d = [c for r in dense for c in r.calls]
    calls_k = [c for r in kvcomm for c in r.calls]
    lines = [f"4-agent debate, {args.rounds} rounds, {len(kvcomm)} questions (+{args.warmup} "
             f"warm-up), {args.max_tokens} new tokens, greedy; TTFT = first streamed token",
             f"{'agent':<8}{'dense TTFT s':>14}{'KVCOMM TTFT s':>15}{'ratio':>8}{'reused calls':>14}"
             f"{'agree':>8}"]
    for agent in DEBATERS:
        d = [c for c in calls_d if c.agent == agent.name]
        k = [c for c in calls_k if c.agent == agent.name]
        td, tk = statistics.median(c.ttft_s for c in d), statistics.median(c.ttft_s for c in k)
        agree = sum(a.text == b.text for a, b in zip(d, k)) / len(d)
        lines.append(f"{agent.name:<8}{td:>14.3f}{tk:>15.3f}{td / tk:>7.2f}x"
                     f"{sum(c.mode == 'reuse' for c in k):>9}/{len(k):<4}{agree:>8.0%}")
    reused = [c for c in calls_k if c.mode == "reuse"]
    token_rate = sum(c.reused_tokens for c in calls_k) / sum(c.prompt_tokens for c in calls_k)
    agree_all = sum(a.text == b.text for a, b in zip(calls_d, calls_k)) / len(calls_d)
    final = sum(a.final_answer == b.final_answer for a, b in zip(dense, kvcomm)) / len(dense)
    reasons = sorted({c.fallback_reason for c in calls_k if c.fallback_reason})
    hits = sum(c.text == d for c, d in zip(calls_k, same) if c.mode == "reuse")
    lo, hi = wilson(hits, len(reused))
    lines += [f"agent-level reuse rate: {len(reused) / len(calls_k):.0%} of calls; token-level: "
              f"{token_rate:.0%} of prompt tokens",
              f"same prompt: {hits}/{len(reused)} reused calls answer exactly as dense prefill of "
              f"that prompt ({hits / max(len(reused), 1):.0%}, 95% interval {lo:.0%}-{hi:.0%})",
              f"end to end (later prompts hold earlier answers): {agree_all:.0%} of calls, "
              f"{final:.0%} of final answers agree with the dense debate",
              f"fallback reasons seen: {', '.join(reasons) or 'none'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
