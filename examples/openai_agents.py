"""A 3-agent loop written with the plain ``openai`` package, nothing of kvcomm-sglang.

Against ``kvcomm-sglang serve --device cpu --kvcomm-auto`` the server finds the shared spans
itself (the question, earlier agents' answers) and reuses their KV across agents:

    kvcomm-sglang serve --device cpu --kvcomm-auto --port 30000
    python examples/openai_agents.py --base-url http://127.0.0.1:30000/v1

Per call it prints whether the server reused the prompt (the response's extra ``kvcomm``
field), the reused tokens (``usage.prompt_tokens_details.cached_tokens`` counts them too) and
the TTFT at this client. ``--compare-dense`` also sends every call's exact messages with the
``X-KVCOMM-Auto: off`` header (served densely, exactly as by SGLang) and reports how often the
two answers agree.
"""

import argparse
import time

from openai import OpenAI

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara had 12 candies and gave 4 to her friend. How many candies are left?",
    "A box holds 6 eggs. How many eggs are in 4 boxes?",
    "A pencil costs 2 dollars. How much do 7 pencils cost?",
    "A rope 15 meters long is cut into 3 equal pieces. How long is each piece?",
    "Lisa reads 10 pages a day. How many pages does she read in 6 days?",
    "A bus has 30 seats and 18 are taken. How many seats are free?",
]
AGENTS = [
    ("solver", "You are a careful math solver. Solve the problem step by step."),
    ("critic", "You are a critic. Check the solver's arithmetic and point out any mistake."),
    ("judge", "You are a judge. Read the discussion and state the final number."),
]


def ask(client, system, question, earlier, max_tokens, user, headers=None):
    """One agent call: its role, the question, then each earlier agent's answer."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    messages += [{"role": "user", "content": f"{name} answered:\n{answer}"}
                 for name, answer in earlier]
    start, ttft, text, kvcomm, usage = time.perf_counter(), None, "", None, None
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, user=user, extra_headers=headers)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            text += chunk.choices[0].delta.content
        kvcomm = kvcomm or (chunk.model_extra or {}).get("kvcomm")
        usage = chunk.usage or usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return text, ttft or time.perf_counter() - start, kvcomm or {}, cached


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:30000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="questions not counted in the rate")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--workflow", default="openai-agents-example",
                        help="the OpenAI 'user' field: the server's workflow for these calls")
    parser.add_argument("--compare-dense", action="store_true")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    counted = reused = agree = 0
    for q_index, question in enumerate(QUESTIONS[:args.questions]):
        earlier = []
        for name, system in AGENTS:
            text, ttft, kvcomm, cached = ask(client, system, question, earlier,
                                             args.max_tokens, args.workflow)
            line = (f"q{q_index + 1} {name:<7} reused={str(kvcomm.get('reused', False)):<5} "
                    f"reused_tokens={kvcomm.get('reused_tokens', 0):<4} cached_tokens={cached:<4} "
                    f"TTFT {ttft:.3f} s {kvcomm.get('fallback_reason') or ''}")
            if args.compare_dense:
                dense, *_ = ask(client, system, question, earlier, args.max_tokens,
                                args.workflow, headers={"X-KVCOMM-Auto": "off"})
                line += f" agree={dense == text}"
                agree += q_index >= args.warmup and kvcomm.get("reused", False) and dense == text
            print(line, flush=True)
            if q_index >= args.warmup:
                counted += 1
                reused += bool(kvcomm.get("reused"))
            earlier.append((name, text))
    if counted:
        print(f"agent-level reuse after {args.warmup} warm-up questions: {reused}/{counted} "
              f"calls ({reused / counted:.0%})")
        if args.compare_dense and reused:
            print(f"reused calls whose answer equals the dense answer: {agree}/{reused}")


if __name__ == "__main__":
    main()
