"""A multi-agent workflow on the CPU server as its client times it: SGLang dense (+ its radix
cache) vs KVCOMM, same server, same run. Prints tables and writes bench-results/ttft_cpu.json.

Workload (the paper's TTFT benchmark, scaled to a CPU): 4 fully connected agents; a fixed
system prefix per agent; a ~700-token user input of random Δ/Ω symbols; 96-token agent outputs
(ignore_eos, as the paper forces its output length); the last agent's prompt is > 1K tokens.
Dense: the same prompts as plain requests (no hints). KVCOMM: the `kvcomm` backend with its
gate disabled by default (gamma 1.0, as the paper's timing script); ``--gamma 0.3`` turns it on.

Every request is on the clock (``workflow_clock.py``): KVCOMM sends no base request (the first
agent computes the question densely and the server keeps its KV as the question's base), each
agent is sent the moment the previous answer is complete, no sleeps. The
agents' template passes (once per namespace) are timed apart. Per round: the dense workflow,
a one-token plain request (``drain``: whatever the server still does for a workflow is done
before the next request; its TTFT is reported), SGLang's radix hit of each dense prompt (one
token, untimed for the workflow), the KVCOMM workflow of the same question, its drain.
The machine is shared: dense and KVCOMM are interleaved round by round so that both see the
same load. Medians over the measured workflows, after warm-up workflows that fill the anchors.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import random
import secrets
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import workflow_clock as wc  # noqa: E402
from kvcomm_sglang.runtime_patch.process import ServerProcess  # noqa: E402
from kvcomm_sglang.segments import split_template  # noqa: E402
from tests.harness.workflow import AgentTemplate  # noqa: E402
from tests.server.workflow_client import encode, prompt, render_chat, template_pass  # noqa: E402

NUM_AGENTS = 4
DEVICE = "CPU (2 cores, shared), SGLang 0.5.17 torch_native, SmolLM2-135M-Instruct bf16"


def templates():
    out = []
    for k in range(NUM_AGENTS):
        system = "You are copy machine " + str(k) + ". " + " Ω" * 48 + \
            " Repeat the symbols of the task exactly."
        user = "The task is:\n{user_question}\n" + "".join(
            f"\nAgent {x} output:\n{{agent_{x}_current}}\n" for x in range(k)) + "\nCopy the task."
        texts, names = split_template(render_chat(system, user))
        out.append(AgentTemplate(str(k), tuple(tuple(encode(t)) for t in texts), tuple(names)))
    return out


def agents() -> wc.Agents:
    temps = templates()
    return wc.Agents([functools.partial(prompt, t) for t in temps],
                     encode("<|im_start|>user\nThe task is:\n"),
                     [(t.agent, *template_pass(t)) for t in temps])


def task(rng: random.Random, tokens: int) -> list[int]:
    """A user input of exactly ``tokens`` token ids of random Δ/Ω symbols (the paper fixes the
    input length; equal lengths keep every question length-compatible with the anchors)."""
    ids = encode(" ".join(rng.choice("ΔΩ") for _ in range(tokens)))
    if len(ids) < tokens:
        raise ValueError(f"{tokens} symbols gave only {len(ids)} tokens")
    return ids[:tokens]


def run_round(url, work, question, new_tokens, r, namespace) -> dict:
    dense = wc.run_workflow(url, work, question, new_tokens, f"d{r}")
    dense_drain = wc.send(url, "drain", None, wc.request(work.lead, 1))
    hits = wc.radix_hits(url, dense)
    kvcomm = wc.run_workflow(url, work, question, new_tokens, f"k{r}", namespace)
    drain = wc.send(url, "drain", None, wc.request(work.lead, 1))
    return {"dense": dense, "kvcomm": kvcomm, "hits": hits, "drain": drain,
            "dense_drain": dense_drain}


def summarize_agents(rounds: list[dict]) -> list[dict]:
    out = []
    for i in range(NUM_AGENTS):
        calls = wc.agent_calls(rounds, i)
        dense, kv, reused, field = calls.dense, calls.kvcomm, calls.reused, calls.reused_median
        d, k = wc.median([c.ttft_s for c in dense]), wc.median([c.ttft_s for c in kv])
        out.append({
            "agent": i, "prompt_tokens": dense[0].prompt_tokens,
            "dense_ttft_s": d, "kvcomm_ttft_s": k, "speedup": d / k,
            "p99_kvcomm_ttft_s": wc.percentile([c.ttft_s for c in kv], 99),
            "dense_radix_hit_ttft_s": wc.median([c.ttft_s for c in calls.hits]),
            # first to last token: the same decode in both modes, plus KVCOMM's capture, which
            # runs before SGLang streams the last token (on the critical path of the next agent)
            "dense_decode_s": wc.median([c.done_s - c.ttft_s for c in dense]),
            "kvcomm_decode_s": wc.median([c.done_s - c.ttft_s for c in kv]),
            "kvcomm_reused_calls_ttft_s": wc.median([c.ttft_s for c in reused]),
            "plan_ms": field("plan_ms"), "materialize_ms": field("materialize_ms"),
            "forward_ms": field("forward_ms"), "reuse_path_ms": field("reuse_path_ms"),
            "reused_calls": len(reused), "calls": len(kv), "fallbacks": calls.fallbacks()})
    return out


def print_tables(result: dict) -> None:
    fmt = lambda x, f=".3f": "-" if x is None else format(x, f)  # noqa: E731
    print("\nper-agent TTFT (s, medians; the agent's own call only: the workflow's other "
          "requests are in the workflow table)")
    print(f"{'agent':>5} {'prompt':>7} {'dense':>7} {'kvcomm':>7} {'speedup':>8} {'p99 kv':>7} "
          f"{'radix hit':>9} {'reused':>7} {'plan ms':>8} {'mat. ms':>8} {'fwd ms':>7} "
          f"{'decode d/kv s':>14}")
    for a in result["agents"]:
        print(f"{a['agent']:>5} {a['prompt_tokens']:>7} {a['dense_ttft_s']:>7.3f} "
              f"{a['kvcomm_ttft_s']:>7.3f} {a['speedup']:>7.2f}x "
              f"{fmt(a['p99_kvcomm_ttft_s']):>7} {fmt(a['dense_radix_hit_ttft_s']):>9} "
              f"{a['reused_calls']:>3}/{a['calls']:<3} {fmt(a['plan_ms'], '.1f'):>8} "
              f"{fmt(a['materialize_ms'], '.1f'):>8} {fmt(a['forward_ms'], '.1f'):>7} "
              f"{a['dense_decode_s']:>6.2f}/{a['kvcomm_decode_s']:<6.2f}")
    w = result["workflow"]
    print(f"\nper workflow (ms, medians of {w['workflows']}; every request counted, no sleeps)")
    print(f"prefill (sum of TTFTs): dense {w['dense_prefill_ms']:.0f}, KVCOMM "
          f"{w['kvcomm_prefill_ms']:.0f} ({w['prefill_speedup']:.2f}x)")
    print(f"end to end (answers decoded): dense {w['dense_e2e_ms']:.0f}, KVCOMM "
          f"{w['kvcomm_e2e_ms']:.0f} ({w['e2e_speedup']:.2f}x)")
    print(f"template passes (once per namespace): {w['kvcomm_template_passes_ms']:.0f}; drain "
          f"request after the KVCOMM workflow: {w['kvcomm_drain_ms']:.0f} "
          f"(after dense: {w['dense_drain_ms']:.0f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--input-tokens", type=int, default=700)
    parser.add_argument("--gamma", type=float, default=1.0,
                        help="entropy gate threshold (the paper's timing run used 1.0: disabled)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", default="bench-results/ttft_cpu.json")
    parser.add_argument("--url", help="an already running kvcomm server (else one is started)")
    parser.add_argument("--max-total-tokens", type=int, default=60000,
                        help="KV pool of the started server: the store holds every consumer's "
                             "deviations of ~1K-token inputs (the CPU default of 20000 is too small)")
    parser.add_argument("--log", help="the started server's log file")
    args = parser.parse_args(argv)
    work, rng = agents(), random.Random(0)
    env = {"KVCOMM_CONFIG": json.dumps({"gamma": args.gamma})}
    server = None if args.url else ServerProcess(
        ["--device", "cpu", "--max-total-tokens", str(args.max_total_tokens)], env=env,
        log_path=args.log)
    if server:
        server.__enter__()
    url = args.url or server.url
    rounds = []
    try:
        namespace = "kvcomm:" + secrets.token_urlsafe(16)   # a workflow secret (docs/isolation.md)
        passes = wc.send_templates(url, work, namespace)
        for r in range(args.warmup + args.repeats):
            one = run_round(url, work, task(rng, args.input_tokens), args.new_tokens, r, namespace)
            print(f"workflow {r + 1}/{args.warmup + args.repeats}: prefill "
                  f"{one['dense'].prefill_s:.2f}/{one['kvcomm'].prefill_s:.2f}s e2e "
                  f"{one['dense'].e2e_s:.2f}/{one['kvcomm'].e2e_s:.2f}s " + " ".join(
                      f"a{d.agent}:{d.ttft_s:.2f}/{k.ttft_s:.2f}s"
                      f"{'*' if k.report.get('mode') == 'reuse' else ''}" for d, k in
                      zip(one["dense"].agent_calls(), one["kvcomm"].agent_calls())),
                  file=sys.stderr)
            if r >= args.warmup:
                rounds.append(one)
    finally:
        if server:
            server.stop()
    block = wc.workflow_block([r["dense"] for r in rounds], [r["kvcomm"] for r in rounds], passes)
    block["kvcomm_drain_ms"] = wc.median([r["drain"].ttft_s * 1e3 for r in rounds])
    block["dense_drain_ms"] = wc.median([r["dense_drain"].ttft_s * 1e3 for r in rounds])
    result = {"device": DEVICE, "gamma": args.gamma, "input_tokens": args.input_tokens,
              "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                   time.gmtime()),
              "warmup": args.warmup, "repeats": args.repeats,
              "interleaved": "dense and KVCOMM workflows alternate round by round on one server",
              "agents": summarize_agents(rounds), "workflow": block,
              "workflows": [{"dense": _calls(r["dense"]), "kvcomm": _calls(r["kvcomm"])}
                            for r in rounds]}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"wrote {out}")
    return result


def _calls(run: wc.Workflow) -> dict:
    return {"e2e_s": run.e2e_s, "prefill_s": run.prefill_s,
            "calls": [{"kind": c.kind, "agent": c.agent, "prompt_tokens": c.prompt_tokens,
                       "ttft_s": c.ttft_s, "done_s": c.done_s, **c.report} for c in run.calls]}


if __name__ == "__main__":
    main()
