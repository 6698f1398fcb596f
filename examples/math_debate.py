"""Math debate: three agents answer, then read each other's answers and answer again.

    python examples/math_debate.py --url http://127.0.0.1:30000   # a `kvcomm-sglang serve` server
"""

import argparse

from kvcomm_sglang.frontend import Agent, AgentGraph, KVCommEndpoint

QUESTIONS = ["What is 7 times 8?", "What is 100 minus 37?", "A box holds 6 eggs. How many eggs "
             "are in 4 boxes?", "What is the square root of 81?"]
AGENTS = [Agent("solver", "You are a careful math solver."),
          Agent("critic", "You are a critic who double-checks arithmetic."),
          Agent("judge", "You are a judge who states one final number.")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    endpoint = KVCommEndpoint(args.url)
    graph = AgentGraph(AGENTS, topology="debate", rounds=args.rounds, max_tokens=32)
    for question in QUESTIONS:
        result = graph.run(question, endpoint)
        print(f"Q: {question}\n   final: {result.final_answer!r}")
        for call in result.calls:
            print(f"   {call.agent:<7} round {call.round} {call.mode:<5} reused "
                  f"{call.reused_tokens:>3}/{call.prompt_tokens:<4} TTFT {call.ttft_s:.3f} s "
                  f"{call.fallback_reason or ''}")


if __name__ == "__main__":
    main()
