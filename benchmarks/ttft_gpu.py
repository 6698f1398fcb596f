"""The paper's workflow through real SGLang servers on a GPU, timed as its client sees it: SGLang
dense (+ its radix cache, the vanilla backend) vs KVCOMM (the ``kvcomm`` backend), same build,
same run, no sleeps.

Workload (reference/kvcomm-algorithm.md §7.4): 5 fully connected agents; per agent a 512-token
system prefix plus template text; a 1024-token user input; 512-token agent outputs (ignore_eos,
as the paper forces its output length). Requests carry ``input_ids`` (the dummy-weight server has
no tokenizer): random ids, fixed per agent for the templates, fresh per workflow for the input.

Per round (``workflow_clock.py``): the dense workflow on the dense server (each agent sent the
moment the previous answer is complete), SGLang's radix hit of each of its prompts (one token,
not part of the workflow), then the KVCOMM workflow of the same question on the kvcomm server
(every agent with hints, back to back; the first computes the question densely and the server
keeps its KV as the question's base: no base request), then a one-token
request to the kvcomm server (``drain``: what it still does for the workflow, e.g. a deferred
capture, ends before the next round; its TTFT is reported). Template passes are sent once per
namespace, timed apart. Reported: per-agent TTFT (the agent's own call), per-workflow prefill
(the sum of the TTFTs of every request the workflow sends) and end to end (answers decoded),
medians after ``--warmup`` rounds. ``--concurrent N``: then N dense workflows at once, then N
KVCOMM workflows at once (the warmed namespace): workflows per minute, agent-level reuse,
prefill tokens computed, p50/p99 TTFT per agent.

    python benchmarks/ttft_gpu.py --kvcomm-url http://127.0.0.1:30000 \\
        --dense-url http://127.0.0.1:30001 --concurrent 32 --out "$OUT/ttft-gpu.json"

``--smoke`` shrinks the workload (for a CPU server: SmolLM2's vocabulary, short texts).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import random
import secrets
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import workflow_clock as wc  # noqa: E402
from benchmarks.workflow_clock import request  # noqa: E402,F401  (soak_traffic imports it here)
from kvcomm_sglang import protocol  # noqa: E402

PAPER_DENSE_MS = (125.8, 192.4, 258.3, 330.9, 428.6)     # HF generate(), H100 (paper's table)
PAPER_SPEEDUP = (1.11, 5.06, 6.14, 6.85, 7.82)


class Workload:
    """Token-id templates of the agents: x0 = system prefix + user header, then per placeholder
    the content and a short template piece (the paper's "Agent X, role is R, output is:")."""

    def __init__(self, agents: int, prefix: int, vocab: tuple[int, int], seed: int):
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.agents = []
        for k in range(agents):
            pieces = [self.ids(prefix + 24)]                    # system prefix + chat boilerplate
            names = ["user_question"]
            for x in range(k):
                pieces.append(self.ids(12))                      # "\nAgent x, role is R, output is:"
                names.append(f"agent_{x}_current")
            pieces.append(self.ids(14))                          # instruction + assistant header
            self.agents.append((str(k), pieces, names))

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(*self.vocab) for _ in range(n)]

    @staticmethod
    def prompt(pieces, names, contents):
        ids, layout = list(pieces[0]), [protocol.Piece("template", len(pieces[0]))]
        for name, piece in zip(names, pieces[1:]):
            message, content = contents[name]
            layout += [protocol.Piece("content", len(content), name, message),
                       protocol.Piece("template", len(piece))]
            ids += list(content) + list(piece)
        return ids, layout

    def client(self) -> wc.Agents:
        """The workload as ``workflow_clock`` runs it (lead: "The task is:", 8 fixed ids)."""
        passes = []
        for agent, pieces, names in self.agents:
            ids, layout = self.prompt(pieces, names, {name: ("standin", self.ids(16))
                                                      for name in names})
            layout = [protocol.Piece(p.kind, p.length, p.placeholder,
                                     None if p.kind == "template" else "standin") for p in layout]
            passes.append((agent, ids, layout))
        return wc.Agents([functools.partial(self.prompt, pieces, names)
                          for _, pieces, names in self.agents], self.ids(8), passes)


def control(url: str, path: str, body: dict | None = None) -> None:
    req = urllib.request.Request(f"{url}/{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()


def profiled(url: str, out_dir: str, send):
    """``send()`` with the server's torch profiler on (its chrome trace lands in out_dir)."""
    control(url, "start_profile", {"output_dir": out_dir, "activities": ["CPU", "GPU"],
                                   "profile_id": pathlib.Path(out_dir).name})
    try:
        return send()
    finally:
        control(url, "stop_profile")


def run_round(args, work: Workload, agents: wc.Agents, r: int, namespace: str) -> dict:
    question = work.ids(args.input_tokens)
    dense = wc.run_workflow(args.dense_url, agents, question, args.output_tokens, f"d{r}")
    hits = wc.radix_hits(args.dense_url, dense)
    kvcomm = wc.run_workflow(args.kvcomm_url, agents, question, args.output_tokens, f"k{r}",
                             namespace)
    drain = wc.send(args.kvcomm_url, "drain", None, wc.request(agents.lead, 1))
    return {"dense": dense, "kvcomm": kvcomm, "hits": hits, "drain": drain}


def profile_last_agent(args, work, agents: wc.Agents, namespace: str) -> list[dict]:
    """One more (untimed) round whose last KVCOMM call (2 tokens) and its dense radix hit run
    under the servers' profilers (traces in profile_dir/{kvcomm,dense-hit})."""
    question, last = work.ids(args.input_tokens), len(agents) - 1
    kvcomm = wc.run_workflow(args.kvcomm_url, wc.Agents(agents.prompts[:last], agents.lead, []),
                             question, args.output_tokens, "profile", namespace)
    contents = {"user_question": ("profile.q", question)}
    for call in kvcomm.agent_calls():
        contents[f"agent_{call.agent}_current"] = (f"profile.a{call.agent}", call.output_ids[:-1])
    ids, layout = agents.prompts[last](contents)
    hints = protocol.encode(agent=str(last), layout=layout,
                            capture=(f"profile.a{last}", f"agent_{last}_current"))
    call = profiled(args.kvcomm_url, f"{args.profile_dir}/kvcomm", lambda: wc.send(
        args.kvcomm_url, "agent", last, wc.request(ids, 2, hints, namespace)))
    wc.send(args.dense_url, "agent", last, wc.request(ids, 1))
    hit = profiled(args.dense_url, f"{args.profile_dir}/dense-hit", lambda: wc.send(
        args.dense_url, "hit", last, wc.request(ids, 1)))
    return [_row(call), _row(hit)]


def run_load(args, work: Workload, agents: wc.Agents, namespace: str) -> dict:
    """``--concurrent`` workflows at once, dense then KVCOMM (fresh questions; each KVCOMM
    workflow a new one of the warmed application, as a service starting one workflow per user
    question: its own messages, the application's templates and anchors), each workflow's
    agents back to back."""
    n = args.concurrent
    application, _ = protocol.split_namespace(namespace)
    workflows = [f"kvcomm:{application}.{secrets.token_urlsafe(16)}" for _ in range(n)]
    questions = [work.ids(args.input_tokens) for _ in range(n)]
    dense_wall, dense = wc.run_concurrent(n, lambda i: wc.run_workflow(
        args.dense_url, agents, questions[i], args.output_tokens, f"ld{i}"))
    kv_wall, kvcomm = wc.run_concurrent(n, lambda i: wc.run_workflow(
        args.kvcomm_url, agents, questions[i], args.output_tokens, f"lk{i}", workflows[i]))
    return load_block(n, dense_wall, dense, kv_wall, kvcomm, len(agents))


def load_block(n, dense_wall, dense, kv_wall, kvcomm, num_agents) -> dict:
    agent_calls = [c for w in kvcomm for c in w.agent_calls()]
    reused = [c for c in agent_calls if c.report.get("mode") == "reuse"]
    ms = lambda xs, q: None if wc.percentile(xs, q) is None else round(  # noqa: E731
        wc.percentile(xs, q) * 1e3, 2)
    per_agent = []
    for i in range(num_agents):
        d = [c.ttft_s for w in dense for c in w.agent_calls() if c.agent == i]
        k = [c.ttft_s for w in kvcomm for c in w.agent_calls() if c.agent == i]
        per_agent.append({"agent": i + 1, "p50_dense_ms": ms(d, 50), "p99_dense_ms": ms(d, 99),
                          "p50_kvcomm_ms": ms(k, 50), "p99_kvcomm_ms": ms(k, 99)})
    fallbacks: dict = {}
    for c in agent_calls:
        reason = c.report.get("fallback_reason")
        if reason:
            fallbacks[reason] = fallbacks.get(reason, 0) + 1
    return {"workflows": n, "reuse_rate": len(reused) / max(len(agent_calls), 1),
            "reused_calls": len(reused), "agent_calls": len(agent_calls),
            "dense_wall_s": dense_wall, "kvcomm_wall_s": kv_wall,
            "dense_per_min": 60 * n / dense_wall, "kvcomm_per_min": 60 * n / kv_wall,
            "prefill_tokens_dense": sum(c.computed_tokens for w in dense for c in w.calls),
            "prefill_tokens_kvcomm": sum(c.computed_tokens for w in kvcomm for c in w.calls),
            "ttft_per_agent": per_agent, "fallbacks": fallbacks,
            "counted": "every request of every workflow (KVCOMM sends no base request); prefill "
                       "tokens = prompt tokens minus the server's cached_tokens (reused tokens "
                       "count as cached)"}


def _row(call: wc.Call) -> dict:
    return {"kind": call.kind, "agent": call.agent, "prompt_tokens": call.prompt_tokens,
            "ttft_s": call.ttft_s, "done_s": call.done_s,
            "cached_tokens": call.meta.get("cached_tokens"), **call.report}


def summarize(rounds: list[dict], num_agents: int) -> list[dict]:
    out = []
    for i in range(num_agents):
        calls = wc.agent_calls(rounds, i)
        dense, kv, hits, reused = calls.dense, calls.kvcomm, calls.hits, calls.reused
        field = calls.reused_median
        ms = lambda group: _ms(wc.median([c.ttft_s for c in group]))  # noqa: E731
        dense_ms, kv_ms = ms(dense), ms(kv)
        out.append({
            "agent": i + 1, "prompt_tokens": dense[0].prompt_tokens if dense else None,
            "dense_ms": dense_ms, "kvcomm_ms": kv_ms,
            "speedup": dense_ms / kv_ms if dense_ms and kv_ms else None,
            "dense_radix_hit_ms": ms(hits),
            "p99_kvcomm_ms": _ms(wc.percentile([c.ttft_s for c in kv], 99)),
            "p99_dense_ms": _ms(wc.percentile([c.ttft_s for c in dense], 99)),
            # first to last token: the same decode in both modes plus KVCOMM's capture, which
            # runs before SGLang streams the last token (the next agent waits for it)
            "dense_decode_ms": _ms(wc.median([c.done_s - c.ttft_s for c in dense])),
            "kvcomm_decode_ms": _ms(wc.median([c.done_s - c.ttft_s for c in kv])),
            "kvcomm_reused_calls_ms": ms(reused),
            "reuse_path_ms": field("reuse_path_ms"), "plan_ms": field("plan_ms"),
            "materialize_ms": field("materialize_ms"), "flatten_ms": field("flatten_ms"),
            "forward_ms": field("forward_ms"),
            "reused_calls": len(reused), "calls": len(kv),
            "reused_tokens": field("reused_tokens"), "fallbacks": calls.fallbacks()})
    return out


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def print_tables(result: dict) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    print(f"\nper-agent TTFT on {result['device']} (ms, medians; the agent's own call only: "
          "KVCOMM's first agent computes the question (no base request); dense = SGLang + radix cache; hit = "
          "the same prompt again, all cached but one token)")
    print(f"{'agent':>5} {'prompt':>7} {'dense':>8} {'kvcomm':>8} {'ratio':>7} {'p99 kv':>8} "
          f"{'reuse path':>11} {'plan':>6} {'mat.':>6} {'fwd':>6} {'hit':>7} {'reused':>7}  "
          "paper dense/ratio")
    for a in result["agents"]:
        i = a["agent"] - 1
        paper = f"{PAPER_DENSE_MS[i]:.1f}/{PAPER_SPEEDUP[i]:.2f}x" if i < len(PAPER_DENSE_MS) else ""
        print(f"{a['agent']:>5} {a['prompt_tokens']:>7} {fmt(a['dense_ms']):>8} "
              f"{fmt(a['kvcomm_ms']):>8} {a['speedup']:>6.2f}x {fmt(a['p99_kvcomm_ms']):>8} "
              f"{fmt(a['reuse_path_ms']):>11} {fmt(a['plan_ms']):>6} "
              f"{fmt(a['materialize_ms']):>6} {fmt(a['forward_ms']):>6} "
              f"{fmt(a['dense_radix_hit_ms']):>7} {a['reused_calls']:>3}/{a['calls']:<3}  {paper}")
    w = result.get("workflow")
    if w and w["kvcomm_prefill_ms"] is not None:
        print(f"per workflow (ms, medians of {w['workflows']}, every request counted, no sleeps): "
              f"prefill {w['dense_prefill_ms']:.1f} dense vs {w['kvcomm_prefill_ms']:.1f} KVCOMM "
              f"({w['prefill_speedup']:.2f}x); "
              f"end to end {w['dense_e2e_ms']:.0f} vs {w['kvcomm_e2e_ms']:.0f} "
              f"({w['e2e_speedup']:.2f}x); drain {fmt(w.get('kvcomm_drain_ms'))}")
    load = result.get("load")
    if load:
        print(f"load: {load['workflows']} workflows at once: {load['dense_per_min']:.1f} dense vs "
              f"{load['kvcomm_per_min']:.1f} KVCOMM per minute, reuse {load['reuse_rate']:.0%} "
              f"of agent calls, prefill tokens {load['prefill_tokens_dense']} vs "
              f"{load['prefill_tokens_kvcomm']}, fallbacks {load['fallbacks']}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvcomm-url", default="http://127.0.0.1:30000")
    parser.add_argument("--dense-url", default="http://127.0.0.1:30001")
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=0,
                        help="after the rounds: this many workflows at once, dense then KVCOMM")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no round that would end after this many seconds (less two "
                             "rounds' time kept for --concurrent), nor the load mode with less "
                             "than that left (the JSON keeps what was timed)")
    parser.add_argument("--vocab", type=int, nargs=2, default=(1000, 128000),
                        help="random ids are drawn from [lo, hi)")
    parser.add_argument("--label", default="", help="a note stored in the JSON (server flags)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny workload (3 agents, 32/96/24 tokens, SmolLM2's vocabulary)")
    parser.add_argument("--profile-dir", default=None,
                        help="after the timed rounds, one more whose last agent is profiled "
                             "(SGLang's /start_profile): traces of the KVCOMM call and of the "
                             "dense radix hit; summarize with benchmarks/gpu/trace_summary.py")
    parser.add_argument("--out", default="bench-results/ttft-gpu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.agents, args.prefix_tokens, args.input_tokens, args.output_tokens = 3, 32, 96, 24
        args.vocab, args.warmup, args.repeats = (1000, 49000), 2, 2
    return args


def main(argv=None) -> dict:
    args, start = parse(argv), time.perf_counter()
    work = Workload(args.agents, args.prefix_tokens, tuple(args.vocab), seed=int(time.time()))
    agents = work.client()
    # one application (its templates and anchors) and the timed workflow's own secret
    namespace = f"kvcomm:{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(16)}"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(), "label": args.label, "sleeps": False,
              "workload": {"agents": args.agents, "prefix_tokens": args.prefix_tokens,
                           "input_tokens": args.input_tokens, "output_tokens": args.output_tokens,
                           "warmup": args.warmup, "repeats": args.repeats,
                           "concurrent": args.concurrent}}
    passes = wc.send_templates(args.kvcomm_url, agents, namespace)
    rounds, last_s, in_budget = [], 0.0, True

    def write():                  # after every round: a cut-off run keeps what it timed
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        if rounds:
            result["agents"] = summarize(rounds, args.agents)
            result["workflow"] = wc.workflow_block([r["dense"] for r in rounds],
                                                   [r["kvcomm"] for r in rounds], passes)
            result["workflow"]["kvcomm_drain_ms"] = _ms(wc.median([r["drain"].ttft_s
                                                                   for r in rounds]))
            result["calls"] = [dict(_row(c), round=i, workflow=mode)
                               for i, r in enumerate(rounds)
                               for mode in ("dense", "kvcomm") for c in r[mode].calls]
        out.write_text(json.dumps(result, indent=2))

    for r in range(args.warmup + args.repeats):
        reserve = 2 * last_s if args.concurrent else 0.0     # the load mode's time
        if args.budget_s and time.perf_counter() - start + last_s + reserve > args.budget_s:
            print(f"budget: {args.budget_s} s reached after {r} rounds", file=sys.stderr)
            in_budget = False
            break
        t0 = time.perf_counter()
        one = run_round(args, work, agents, r, namespace)
        last_s = time.perf_counter() - t0
        print(f"round {r + 1}/{args.warmup + args.repeats}: prefill "
              f"{one['dense'].prefill_s * 1e3:.0f}/{one['kvcomm'].prefill_s * 1e3:.0f} ms, e2e "
              f"{one['dense'].e2e_s:.2f}/{one['kvcomm'].e2e_s:.2f} s; " + " ".join(
                  f"a{d.agent + 1}:{d.ttft_s * 1e3:.0f}/{k.ttft_s * 1e3:.0f}ms"
                  f"{'*' if k.report.get('mode') == 'reuse' else ''}" for d, k in
                  zip(one["dense"].agent_calls(), one["kvcomm"].agent_calls())), file=sys.stderr)
        if r >= args.warmup:
            rounds.append(one)
            write()
    left = args.budget_s - (time.perf_counter() - start) if args.budget_s else float("inf")
    if args.concurrent and in_budget and left > 2 * last_s:   # ~ a round per mode at once
        result["load"] = run_load(args, work, agents, namespace)
        write()
    if args.profile_dir:             # not timed: the profiler slows both servers down
        result["profiled_calls"] = profile_last_agent(args, work, agents, namespace)
    write()
    if rounds:
        print_tables(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
