"""Per-agent TTFT on the CPU server: SGLang dense (+ its radix cache) vs KVCOMM, same server
build, same run. Prints a table and writes bench-results/ttft_cpu.json.

Workload (the paper's TTFT benchmark, scaled to a CPU): 4 fully connected agents; a fixed
system prefix per agent; a ~700-token user input of random Δ/Ω symbols; 96-token agent outputs
(ignore_eos, as the paper forces its output length); the last agent's prompt is > 1K tokens.
Dense: the same prompts as plain requests (no hints). KVCOMM: the `kvcomm` backend with its
gate disabled by default (gamma 1.0, as the paper's timing script); ``--gamma 0.3`` turns it on.
TTFT = time to the first streamed token at the client.
Medians over the measured workflows, after warm-up workflows that fill the anchor pools.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import secrets
import statistics
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang import protocol  # noqa: E402
from kvcomm_sglang.runtime_patch.process import ServerProcess  # noqa: E402
from kvcomm_sglang.segments import split_template  # noqa: E402
from tests.harness.workflow import AgentTemplate  # noqa: E402
from tests.server.workflow_client import encode, prompt, render_chat, template_pass  # noqa: E402
from ttft_gpu import post, request  # noqa: E402  (this folder: the same streamed request)

NUM_AGENTS = 4


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


def task(rng: random.Random, tokens: int) -> list[int]:
    """A user input of exactly ``tokens`` token ids of random Δ/Ω symbols (the paper fixes the
    input length; equal lengths keep every question length-compatible with the anchors)."""
    ids = encode(" ".join(rng.choice("ΔΩ") for _ in range(tokens)))
    if len(ids) < tokens:
        raise ValueError(f"{tokens} symbols gave only {len(ids)} tokens")
    return ids[:tokens]


def stream(url: str, ids, new_tokens: int, hints=None, namespace=None):
    """-> (ttft_s, output_ids, meta_info) of one streamed greedy request."""
    return post(url, request(ids, new_tokens, hints, namespace))


def run_workflow(url, temps, question_ids, new_tokens, kvcomm, qid, namespace):
    """One question through all agents; returns per-agent (prompt_tokens, ttft, report)."""
    contents, out = {}, []
    if kvcomm:
        lead = encode("<|im_start|>user\nThe task is:\n")
        t0 = time.perf_counter()
        stream(url, lead + question_ids, 1, protocol.encode(base=(f"{qid}.q", "user_question",
                                                                  len(lead))), namespace)
        base_s = time.perf_counter() - t0
    else:
        base_s = 0.0
    contents["user_question"] = (f"{qid}.q", question_ids)
    for t in temps:
        ids, layout = prompt(t, contents)
        name = f"agent_{t.agent}_current"
        hints = protocol.encode(agent=t.agent, layout=layout, capture=(f"{qid}.a{t.agent}", name)) \
            if kvcomm else None
        ttft, output, meta = stream(url, ids, new_tokens, hints, namespace if kvcomm else None)
        report = (meta.get("kvcomm") or [None])[0]
        out.append((len(ids), ttft, report))
        contents[name] = (f"{qid}.a{t.agent}", output[:-1])
    return out, base_s


def register_templates(url, temps, namespace):
    for t in temps:
        ids, layout = template_pass(t)
        stream(url, ids, 1, protocol.encode(agent=t.agent, layout=layout, template=True),
               namespace)


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
    args = parser.parse_args(argv)
    temps, rng = templates(), random.Random(0)
    env = {"KVCOMM_CONFIG": json.dumps({"gamma": args.gamma})}
    server = None if args.url else ServerProcess(
        ["--device", "cpu", "--max-total-tokens", str(args.max_total_tokens)], env=env)
    if server:
        server.__enter__()
    url = args.url or server.url
    try:
        namespace = "kvcomm:" + secrets.token_urlsafe(16)   # a workflow secret (docs/isolation.md)
        register_templates(url, temps, namespace)
        rows = {i: {"dense": [], "kvcomm": [], "reuse_only": [], "reused": 0, "prompt": []}
                for i in range(NUM_AGENTS)}
        bases = []
        for r in range(args.warmup + args.repeats):
            q = task(rng, args.input_tokens)
            dense, _ = run_workflow(url, temps, q, args.new_tokens, False, f"d{r}", None)
            kv, base_s = run_workflow(url, temps, q, args.new_tokens, True, f"k{r}", namespace)
            print(f"workflow {r + 1}/{args.warmup + args.repeats}: " + " ".join(
                f"a{i}:{d[1]:.2f}/{k[1]:.2f}s{'*' if (k[2] or {}).get('mode') == 'reuse' else ''}"
                for i, (d, k) in enumerate(zip(dense, kv))), file=sys.stderr)
            if r < args.warmup:
                continue
            bases.append(base_s)
            for i, (d, k) in enumerate(zip(dense, kv)):
                rows[i]["dense"].append(d[1])
                rows[i]["kvcomm"].append(k[1])
                rows[i]["prompt"].append(d[0])
                if (k[2] or {}).get("mode") == "reuse":
                    rows[i]["reused"] += 1
                    rows[i]["reuse_only"].append(k[1])
    finally:
        if server:
            server.stop()
    agents = [{"agent": i, "prompt_tokens": int(statistics.median(v["prompt"])),
               "dense_ttft_s": statistics.median(v["dense"]),
               "kvcomm_ttft_s": statistics.median(v["kvcomm"]),
               "speedup": statistics.median(v["dense"]) / statistics.median(v["kvcomm"]),
               "kvcomm_reused_calls_ttft_s": (statistics.median(v["reuse_only"])
                                              if v["reuse_only"] else None),
               "reused_calls": v["reused"], "calls": len(v["kvcomm"])} for i, v in rows.items()]
    result = {"device": "CPU (2 cores), SGLang 0.5.17 torch_native, SmolLM2-135M-Instruct bf16",
              "gamma": args.gamma, "input_tokens": args.input_tokens, "new_tokens": args.new_tokens,
              "date": time.strftime("%Y-%m-%d"), "warmup": args.warmup, "repeats": args.repeats,
              "question_base_s_median": statistics.median(bases), "agents": agents}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'agent':>5} {'prompt':>7} {'dense s':>9} {'kvcomm s':>9} {'speedup':>8} "
          f"{'reused':>7} {'reused-call s':>14}")
    for a in agents:
        only = a["kvcomm_reused_calls_ttft_s"]
        print(f"{a['agent']:>5} {a['prompt_tokens']:>7} {a['dense_ttft_s']:>9.3f} "
              f"{a['kvcomm_ttft_s']:>9.3f} {a['speedup']:>7.2f}x {a['reused_calls']:>3}/{a['calls']}"
              f" {'-' if only is None else format(only, '.3f'):>14}")
    print(f"question base request (KVCOMM only, before agent 0): "
          f"{result['question_base_s_median']:.3f} s\nwrote {out}")


if __name__ == "__main__":
    main()
