"""Code writer / reviewer / tester loop (chain topology, two rounds): the writer sees the
tester's previous report, the reviewer sees the writer's code, the tester sees the review.

    python examples/code_review.py --url http://127.0.0.1:30000
"""

import argparse

from kvcomm_sglang.frontend import Agent, AgentGraph, KVCommEndpoint

TASKS = ["Write a Python function is_even(n) that returns True for even numbers.",
         "Write a Python function add(a, b) that returns the sum of a and b.",
         "Write a Python function square(x) that returns x squared.",
         "Write a Python function first(items) that returns the first item of a list."]
AGENTS = [
    Agent("writer", "You are a Python programmer. Reply with code only.",
          "Task:\n{user_question}\nLast test report:\n{agent_tester_history}\nWrite the code."),
    Agent("reviewer", "You are a code reviewer.",
          "Task:\n{user_question}\nCode:\n{agent_writer_current}\nList problems briefly."),
    Agent("tester", "You are a tester who writes one assert per case.",
          "Task:\n{user_question}\nCode:\n{agent_writer_current}\nReview:\n"
          "{agent_reviewer_current}\nWrite two asserts and say if they pass."),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    endpoint = KVCommEndpoint(args.url)
    graph = AgentGraph(AGENTS, topology="chain", rounds=2, max_tokens=48)
    for task in TASKS:
        result = graph.run(task, endpoint)
        print(f"TASK: {task}\n{result.final_answer}\n")
        for call in result.calls:
            print(f"   {call.agent:<8} round {call.round} {call.mode:<5} reused "
                  f"{call.reused_tokens:>3}/{call.prompt_tokens:<4} TTFT {call.ttft_s:.3f} s "
                  f"{call.fallback_reason or ''}")


if __name__ == "__main__":
    main()
