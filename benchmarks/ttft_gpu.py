"""The paper's TTFT benchmark through real SGLang servers on a GPU: per-agent TTFT of SGLang dense
(+ its radix cache, the vanilla backend) vs KVCOMM (the ``kvcomm`` backend), same build, same run.

Workload (reference/kvcomm-algorithm.md §7.4): 5 fully connected agents; per agent a 512-token
system prefix plus template text; a 1024-token user input; 512-token agent outputs (ignore_eos,
as the paper forces its output length). Requests carry ``input_ids`` (the dummy-weight server has
no tokenizer): random ids, fixed per agent for the templates, fresh per workflow for the input.

Per workflow, agent by agent: the KVCOMM server gets the agent's call with hints and streams its
512-token answer, captured as the message later agents reuse; then the dense server gets the
same ``input_ids`` without hints (the paper's timing variant: dense TTFT of the same prompt), and
once more (all of it cached but the last token: SGLang's own radix-hit path). TTFT is the client's
time to the first streamed token. The first ``--warmup`` workflows fill the anchor pools and are
not timed; then medians over ``--repeats`` workflows. The KVCOMM server reports, per reused call,
the time of its reuse path (matching + weights + materialize; exact with KVCOMM_PROFILE=1).

    python benchmarks/ttft_gpu.py --kvcomm-url http://127.0.0.1:30000 \\
        --dense-url http://127.0.0.1:30001 --out "$OUT/ttft-gpu.json"

``--smoke`` shrinks the workload (for a CPU server: SmolLM2's vocabulary, short texts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import random
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang import protocol  # noqa: E402

PAPER_DENSE_MS = (125.8, 192.4, 258.3, 330.9, 428.6)     # HF generate(), H100 (paper's table)
PAPER_SPEEDUP = (1.11, 5.06, 6.14, 6.85, 7.82)


def post(url: str, body: dict, timeout: float = 600):
    """-> (ttft_s, output_ids, meta_info) of one streamed greedy request."""
    body = dict(body, stream=True)
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start, ttft, last = time.perf_counter(), None, None
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for line in resp:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            last = json.loads(line[5:])
            if "error" in last:
                raise RuntimeError(last["error"])
    if last is None:
        raise RuntimeError(f"{url}: no streamed output")
    return ttft, list(last["output_ids"]), last["meta_info"]


def request(ids, new_tokens: int, hints=None, namespace=None) -> dict:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    if hints:
        params["custom_params"] = hints
    body = {"input_ids": list(ids), "sampling_params": params}
    if namespace:
        body["extra_key"] = namespace
    return body


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


def register_templates(url, work: Workload, namespace: str) -> None:
    for agent, pieces, names in work.agents:
        standins = {name: ("standin", work.ids(16)) for name in names}
        ids, layout = work.prompt(pieces, names, standins)
        layout = [protocol.Piece(p.kind, p.length, p.placeholder, None if p.kind == "template"
                                 else "standin") for p in layout]
        post(url, request(ids, 1, protocol.encode(agent=agent, layout=layout, template=True),
                          namespace))


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


def run_workflow(args, work: Workload, qid: str, namespace: str,
                 profile_dir: str | None = None) -> list[dict]:
    """One workflow; with ``profile_dir`` the last agent's KVCOMM call (2 tokens) and its dense
    radix hit run under the servers' profilers (traces in profile_dir/{kvcomm,dense-hit})."""
    question = work.ids(args.input_tokens)
    lead = work.ids(8)                                           # "The task is:" (neutral context)
    post(args.kvcomm_url, request(lead + question, 1, protocol.encode(
        base=(f"{qid}.q", "user_question", len(lead))), namespace))
    contents, rows = {"user_question": (f"{qid}.q", question)}, []
    for agent, pieces, names in work.agents:
        ids, layout = work.prompt(pieces, names, contents)
        name = f"agent_{agent}_current"
        hints = protocol.encode(agent=agent, layout=layout, capture=(f"{qid}.a{agent}", name))
        profile = profile_dir is not None and int(agent) == len(work.agents) - 1
        send = lambda: post(args.kvcomm_url, request(  # noqa: E731
            ids, 2 if profile else args.output_tokens, hints, namespace))
        kv_ttft, output, meta = profiled(args.kvcomm_url, f"{profile_dir}/kvcomm", send) \
            if profile else send()
        report = (meta.get("kvcomm") or [None])[0] or {}
        time.sleep(args.settle_s)        # the kvcomm server's capture work must not overlap
        dense_ttft, _, _ = post(args.dense_url, request(ids, 1))
        time.sleep(args.settle_s)
        send = lambda: post(args.dense_url, request(ids, 1))  # noqa: E731
        hit_ttft, _, hit_meta = profiled(args.dense_url, f"{profile_dir}/dense-hit", send) \
            if profile else send()
        time.sleep(args.settle_s)
        rows.append({"agent": int(agent), "prompt_tokens": len(ids), "dense_s": dense_ttft,
                     "kvcomm_s": kv_ttft, "dense_radix_hit_s": hit_ttft,
                     "hit_cached_tokens": hit_meta.get("cached_tokens"), **report})
        contents[name] = (f"{qid}.a{agent}", output[:-1])
    return rows


def median(values):
    return statistics.median(values) if values else None


def summarize(calls: list[dict], agents: int) -> list[dict]:
    out = []
    for i in range(agents):
        rows = [c for c in calls if c["agent"] == i]
        reused = [c for c in rows if c.get("mode") == "reuse"]
        dense_ms, kv_ms = median([c["dense_s"] * 1e3 for c in rows]), median([c["kvcomm_s"] * 1e3 for c in rows])
        out.append({
            "agent": i + 1, "prompt_tokens": int(median([c["prompt_tokens"] for c in rows])),
            "dense_ms": dense_ms, "kvcomm_ms": kv_ms, "speedup": dense_ms / kv_ms,
            "reuse_path_ms": median([c["reuse_path_ms"] for c in reused if "reuse_path_ms" in c]),
            "plan_ms": median([c["plan_ms"] for c in reused if "plan_ms" in c]),
            "materialize_ms": median([c["materialize_ms"] for c in reused if "materialize_ms" in c]),
            "flatten_ms": median([c["flatten_ms"] for c in reused if "flatten_ms" in c]),
            "kvcomm_reused_calls_ms": median([c["kvcomm_s"] * 1e3 for c in reused]),
            "dense_radix_hit_ms": median([c["dense_radix_hit_s"] * 1e3 for c in rows]),
            "reused_calls": len(reused), "calls": len(rows),
            "reused_tokens": median([c.get("reused_tokens", 0) for c in reused]),
            "fallbacks": sorted({c["fallback_reason"] for c in rows if c.get("fallback_reason")}),
        })
    return out


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


def print_table(agents: list[dict], device: str) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    print(f"\nTTFT per agent on {device} (ms, medians; dense = SGLang + radix cache, vanilla "
          "backend; hit = the same prompt again, all cached but one token)")
    print(f"{'agent':>5} {'prompt':>7} {'dense':>8} {'kvcomm':>8} {'ratio':>7} {'reuse path':>11} "
          f"{'plan':>6} {'mat.':>6} {'flat.':>6} {'hit':>7} {'reused':>7}  paper dense/ratio")
    for a in agents:
        i = a["agent"] - 1
        paper = f"{PAPER_DENSE_MS[i]:.1f}/{PAPER_SPEEDUP[i]:.2f}x" if i < len(PAPER_DENSE_MS) else ""
        print(f"{a['agent']:>5} {a['prompt_tokens']:>7} {fmt(a['dense_ms']):>8} "
              f"{fmt(a['kvcomm_ms']):>8} {a['speedup']:>6.2f}x {fmt(a['reuse_path_ms']):>11} "
              f"{fmt(a['plan_ms']):>6} {fmt(a['materialize_ms']):>6} {fmt(a['flatten_ms']):>6} "
              f"{fmt(a['dense_radix_hit_ms']):>7} {a['reused_calls']:>3}/{a['calls']:<3}  {paper}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvcomm-url", default="http://127.0.0.1:30000")
    parser.add_argument("--dense-url", default="http://127.0.0.1:30001")
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, nargs=2, default=(1000, 128000),
                        help="random ids are drawn from [lo, hi)")
    parser.add_argument("--settle-s", type=float, default=0.5,
                        help="pause between requests, so that one server's post-request work "
                             "(KVCOMM's capture) never overlaps a timed request on the other")
    parser.add_argument("--label", default="", help="a note stored in the JSON (server flags)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny workload (3 agents, 32/96/24 tokens, SmolLM2's vocabulary)")
    parser.add_argument("--profile-dir", default=None,
                        help="after the timed workflows, one more whose last agent is profiled "
                             "(SGLang's /start_profile): traces of the KVCOMM call and of the "
                             "dense radix hit; summarize with benchmarks/gpu/trace_summary.py")
    parser.add_argument("--out", default="bench-results/ttft-gpu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.agents, args.prefix_tokens, args.input_tokens, args.output_tokens = 3, 32, 96, 24
        args.vocab, args.warmup, args.repeats, args.settle_s = (1000, 49000), 2, 2, 0.0
    work = Workload(args.agents, args.prefix_tokens, tuple(args.vocab), seed=int(time.time()))
    namespace = "kvcomm:" + secrets.token_urlsafe(16)     # a workflow secret (docs/isolation.md)
    register_templates(args.kvcomm_url, work, namespace)
    calls, profile_calls, device = [], [], device_name()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():                     # after every workflow: a cut-off run keeps what it timed
        result = {"device": device,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "label": args.label, "settle_s": args.settle_s,
                  "workload": {"agents": args.agents, "prefix_tokens": args.prefix_tokens,
                               "input_tokens": args.input_tokens,
                               "output_tokens": args.output_tokens, "warmup": args.warmup,
                               "repeats": args.repeats},
                  "agents": summarize(calls, args.agents) if calls else [], "calls": calls,
                  "profiled_calls": profile_calls}
        out.write_text(json.dumps(result, indent=2))
        return result["agents"]

    for r in range(args.warmup + args.repeats):
        rows = run_workflow(args, work, f"w{r}", namespace)
        print(f"workflow {r + 1}/{args.warmup + args.repeats}: " + " ".join(
            f"a{c['agent'] + 1}:{c['dense_s'] * 1e3:.0f}/{c['kvcomm_s'] * 1e3:.0f}ms"
            f"{'*' if c.get('mode') == 'reuse' else ''}" for c in rows), file=sys.stderr)
        if r >= args.warmup:
            calls += rows
            write()
    if args.profile_dir:             # not timed: the profiler slows both servers down
        profile_calls = run_workflow(args, work, "profile", namespace, args.profile_dir)
    agents = write()
    print_table(agents, device)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
