"""Same-call agreement of reused answers with dense answers, inside the real CPU server.

The workflow: the harness's 3 agents (Solver, Checker, Summarizer) and a Judge that picks the
Solver's or the Checker's answer (tests/harness/workflow.py), on the question set, greedy.

1. Reference (the first mode's server): the workflow runs dense; every prompt holds the dense
   answers before it. Agent by agent, every question's call is sent at once without hints, in
   a namespace whose tree holds the agents' templates (the prefill starts after the cached
   prefix) = **dense**, and in the same wave in a fresh namespace each (the whole prompt
   prefilled) = the **noise floor**: how often bf16 rounding alone (another prefill split,
   another place in the batch) changes an answer.
2. Each mode (a server started with that mode's KVCOMM_CONFIG): the very same prompts, with
   KVCOMM hints. ``--streams`` workflows of one application (they share its templates and
   anchors, docs/isolation.md) run at once, question i in workflow i % streams, each in
   question order; anchors are learned online from the mode's own dense fallbacks. The
   question's base KV comes from the first agent's dense call, as the product computes it (the
   first call that holds a message stores it; that call is sent first); a mode with
   ``"question_base": "neutral"`` (a client-side key, not sent to the server) sends a base
   request after a neutral header instead, as the official code. The
   answers agents 0 and 1 gave under dense become the messages later prompts reuse (base
   requests: the producer's prompt, then the answer, so the message's base KV is the
   producer's KV of those tokens). A difference is therefore that call's own, never a cascade
   from an earlier answer. Within a question the agents' calls go at once (their prompts are
   known); questions follow each other per workflow. With ``--reproduce`` each later server
   first re-sends the first agent's dense wave (``reference_reproduced``).

Reported per mode, over the calls the mode served by reuse (``same_calls``), with 95 % bootstrap
intervals: tests/harness/agreement.py's measures; agent-level reuse after the first
``--warmup`` questions; the noise floor on the same calls; the paired difference to
position_only. Writes bench-results/agreement.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import pathlib
import secrets
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang import protocol  # noqa: E402
from kvcomm_sglang.runtime_patch.process import ServerProcess  # noqa: E402
from tests.harness import agreement, workflow  # noqa: E402
from tests.server.workflow_client import (encode, generate, new_namespace, prompt,  # noqa: E402
                                          render_chat, template_pass, tokenizer)

MODES = {"position_only": {"position_only": True}, "kvcomm": {}, "kvcomm_gamma1": {"gamma": 1.0},
         "kvcomm_neutral_base": {"question_base": "neutral"}}
# the ablation rows of docs/fidelity.md that the server can run (the oracle runs all of them)
OPTIONS = {"temperature_0.3": {"temperature": 0.3}, "last_piece": {"recompute_last_piece": True},
           "recompute_16": {"recompute_last": 16}, "max_anchors_5": {"max_anchors": 5},
           "kvcomm_absolute": {"derotated_storage": False}}
CLIENT_KEYS = ("question_base",)        # mode keys the client reads, never sent to the server
TIMEOUT_S = 3600
PRODUCERS = ("0", "1")          # agents whose answers later prompts hold (the judge reads 0, 1)


def gen(url: str, ids, max_new_tokens: int, hints=None, namespace=None):
    """/generate, greedy, with room for a long queue on a shared 2-core machine."""
    return generate(url, ids, max_new_tokens, hints, namespace, timeout=TIMEOUT_S)


def templates():
    return workflow.agent_templates(render_chat, encode, judge=True)


def judge_agent() -> str:
    return str(len(workflow.AGENTS))


def parallel(fn, items, workers: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(fn, items))


def plain_namespace() -> str:
    """A namespace for hint-less calls, its tree warmed with the agents' template passes."""
    return "plain:" + new_namespace().removeprefix("kvcomm:")


def warm(url: str, namespace: str) -> str:
    for t in templates():
        gen(url, template_pass(t)[0], 1, namespace=namespace)
    return namespace


def reference(url: str, questions: int, new_tokens: int, streams: int) -> list[dict]:
    """The dense workflow: every call's prompt, its dense answer and its noise-floor answer."""
    plain = warm(url, plain_namespace())
    contents = [{"user_question": (f"q{i}.q", workflow.question_base(
        workflow.QUESTIONS[i], encode).content_ids)} for i in range(questions)]
    calls = []
    for t in templates():
        wave = []
        for i in range(questions):
            ids, layout = prompt(t, contents[i])
            wave.append({"call": f"{i}.{t.agent}", "question": i, "agent": t.agent, "ids": ids,
                         "layout": [dataclasses.asdict(p) for p in layout]})
        jobs = [(c, plain) for c in wave] + [(c, "noise:" + new_namespace()) for c in wave]
        answers = parallel(lambda job: gen(url, job[0]["ids"], new_tokens, namespace=job[1]),
                           jobs, len(jobs))           # one wave: dense and noise batch together
        for c, d, z in zip(wave, answers[:len(wave)], answers[len(wave):]):
            c["dense"], c["noise"] = d.output_ids, z.output_ids
            contents[c["question"]][f"agent_{t.agent}_current"] = (
                f"q{c['question']}.a{t.agent}", c["dense"][:-1])
        calls += wave
        progress("reference (agents)", int(t.agent), len(templates()))
    return sorted(calls, key=lambda c: (c["question"], int(c["agent"])))


def reproduced(url: str, calls: list[dict], new_tokens: int) -> float:
    """Re-send the first agent's dense wave on this server: the share of the same answers."""
    plain = warm(url, plain_namespace())
    wave = [c for c in calls if c["agent"] == "0"]
    again = parallel(lambda c: gen(url, c["ids"], new_tokens, namespace=plain), wave,
                     len(wave))
    return agreement.share(a.output_ids == c["dense"] for a, c in zip(again, wave))


def run_mode(url: str, name: str, calls: list[dict], new_tokens: int, streams: int,
             neutral: bool = False) -> list[dict]:
    """The reference prompts with KVCOMM hints, ``streams`` workflows of one application at
    once; -> one row per call (served how, answer), in call order."""
    application = secrets.token_urlsafe(16)
    questions = sorted({c["question"] for c in calls})
    done = []

    def stream(s: int) -> list[dict]:
        ns = f"kvcomm:{application}.{secrets.token_urlsafe(16)}"
        for t in templates():
            ids, layout = template_pass(t)
            gen(url, ids, 1, protocol.encode(agent=t.agent, layout=layout, template=True),
                     ns)
        rows = []
        for q in questions[s::streams]:
            rows += run_question(url, ns, [c for c in calls if c["question"] == q], new_tokens,
                                 neutral)
            done.append(q)
            progress(name, len(done) - 1, len(questions))
        return rows

    rows = [r for part in parallel(stream, range(streams), streams) for r in part]
    order = {c["call"]: i for i, c in enumerate(calls)}
    return sorted(rows, key=lambda r: order[r["call"]])


def run_question(url: str, ns: str, calls: list[dict], new_tokens: int,
                 neutral: bool = False) -> list[dict]:
    """The producers' calls in order, then every other call at once (each prompt is known: it
    holds dense's answers, and a consumer's plan needs its own deviations, which no other
    agent's dense run of this question adds). The question: the first agent's call computes it,
    or with ``neutral`` a base request first. A producer's answer (dense's, so that every mode
    reads the same prompts) becomes its message through a base request of the producer's prompt
    plus the answer, sent right after the producer's own call: sent before it, that request puts
    the exact prompt in the namespace's radix tree, and the call is then an exact radix hit, not
    a reuse (until 2026-12-03's third session agents 0 and 1 were, in every mode)."""
    q = calls[0]["question"]
    assert calls[0]["agent"] == "0", calls[0]["call"]
    if neutral:
        base = workflow.question_base(workflow.QUESTIONS[q], encode)
        gen(url, base.ids, 1, protocol.encode(base=(f"q{q}.q", "user_question", base.drop)), ns)

    def call(c):
        layout = [protocol.Piece(**p) for p in c["layout"]]
        out = gen(url, c["ids"], new_tokens, protocol.encode(agent=c["agent"], layout=layout), ns)
        return {"call": c["call"], "question": q, "agent": c["agent"], **out.kvcomm,
                "ids": out.output_ids}

    rows = []
    for c in (c for c in calls if c["agent"] in PRODUCERS):
        rows.append(call(c))
        gen(url, c["ids"] + c["dense"][:-1], 1, protocol.encode(
            base=(f"q{q}.a{c['agent']}", f"agent_{c['agent']}_current", len(c["ids"]))), ns)
    rest = [c for c in calls if c["agent"] not in PRODUCERS]
    return rows + parallel(call, rest, len(rest))


def score(calls: list[dict], rows: list[dict]) -> list[dict]:
    """Each row compared with dense's answer to the same prompt (and the noise floor's)."""
    decode = tokenizer().decode
    by_call = {c["call"]: c for c in calls}
    scored = []
    for r in rows:
        c = by_call[r["call"]]
        texts = (decode(r["ids"], skip_special_tokens=True),
                 decode(c["dense"], skip_special_tokens=True))
        judge = r["agent"] == judge_agent()
        expected = workflow.ANSWERS[r["question"]]
        noise = agreement.compare(c["noise"], c["dense"], (decode(
            c["noise"], skip_special_tokens=True), texts[1]), expected, judge, workflow.judge_pick)
        scored.append({**{k: v for k, v in r.items() if k != "ids"},
                       **agreement.compare(r["ids"], c["dense"], texts, expected, judge,
                                           workflow.judge_pick),
                       "noise": noise, "answer": texts[0], "dense_answer": texts[1]})
    return scored


def summarize_mode(scored: list[dict], warmup: int) -> dict:
    reused = [r for r in scored if r["mode"] == "reuse"]
    after = [r for r in scored if r["question"] >= warmup]
    fallbacks = [r for r in scored if r["mode"] != "reuse"]
    reasons = sorted({r["fallback_reason"] for r in fallbacks if r["fallback_reason"]})
    return {
        "agent_reuse_rate": agreement.share(r["mode"] == "reuse" for r in after),
        "agent_reuse_rate_all": agreement.share(r["mode"] == "reuse" for r in scored),
        **agreement.summarize(reused),
        "noise_floor_same_calls": {k: agreement.share(r["noise"][k] for r in reused)
                                   for k in ("first_token_agreement", "answer_agreement")},
        "dense_fallback_answer_agreement": agreement.share(r["answer_agreement"]
                                                           for r in fallbacks),
        "fallbacks": {x: sum(r["fallback_reason"] == x for r in fallbacks) for x in reasons},
        "reused_calls_by_agent": {a: sum(r["agent"] == a for r in reused)
                                  for a in sorted({r["agent"] for r in scored})},
    }


def noise_floor(scored: list[dict]) -> dict:
    """Dense vs dense of the same prompt, another prefill split: over every call."""
    out = agreement.summarize([r["noise"] for r in scored])
    out["calls"] = out.pop("same_calls")
    return out


def paired(scored: dict, baseline: str = "position_only") -> dict:
    """Each mode minus ``baseline`` on the calls both reused (first token, 8 tokens, answer)."""
    if baseline not in scored:
        return {}
    base = [r for r in scored[baseline] if r["mode"] == "reuse"]
    out = {}
    for name, rows in scored.items():
        if name == baseline:
            continue
        mine = [r for r in rows if r["mode"] == "reuse"]
        out[f"{name}_minus_{baseline}"] = {
            m: agreement.paired_difference(mine, base, m)
            for m in ("first_token_agreement", "first8_agreement", "answer_agreement")}
    return out


def progress(label: str, i: int, n: int) -> None:
    print(f"\r  {label:<24} {i + 1}/{n}", end="" if i + 1 < n else "\n", file=sys.stderr,
          flush=True)


def parse_modes(args) -> dict:
    known = {**MODES, **OPTIONS}
    unknown = [name for name in args.modes.split(",") if name and name not in known]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {sorted(known)}")
    modes = {name: known[name] for name in args.modes.split(",") if name}
    for extra in args.mode or []:
        name, _, config = extra.partition("=")
        modes[name] = json.loads(config)
    return modes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(workflow.QUESTIONS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4,
                        help="the first questions, not counted in the reuse rate")
    parser.add_argument("--streams", type=int, default=4,
                        help="workflows (of one application) run at once")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {sorted(MODES)} and the options "
                             f"{sorted(OPTIONS)}")
    parser.add_argument("--mode", action="append", metavar="NAME=JSON",
                        help="another mode: its KVCOMM_CONFIG, e.g. "
                             "'last_piece={\"recompute_last_piece\": true}' (repeatable)")
    parser.add_argument("--out", default="bench-results/agreement.json")
    parser.add_argument("--reproduce", action="store_true",
                        help="on every later server, re-send the first agent's dense wave first")
    parser.add_argument("--keep", help="an earlier agreement JSON on the same --reference: its "
                                        "modes are kept, not run again")
    parser.add_argument("--reference", help="JSON file: the dense reference is read from it "
                                             "when it exists, else computed and written there")
    args = parser.parse_args(argv)
    modes = parse_modes(args)
    started, scored, checks = time.time(), {}, {}
    saved = pathlib.Path(args.reference) if args.reference else None
    calls = json.loads(saved.read_text()) if saved and saved.exists() else None
    if args.keep:                       # modes an earlier run scored on the same reference
        kept = json.loads(pathlib.Path(args.keep).read_text())
        for name, rows in kept["calls"].items():
            modes.setdefault(name, kept["modes"][name]["config"])
            scored[name] = rows
        checks.update(kept.get("reference_reproduced", {}))
    for name, config in modes.items():
        if name in scored:
            continue
        env = {"KVCOMM_CONFIG": json.dumps(server_config(config)), "KVCOMM_DEBUG_INVARIANTS": "1"}
        with ServerProcess(["--device", "cpu"], env=env) as server:
            if calls is None:
                calls = reference(server.url, args.questions, args.new_tokens, args.streams)
                if saved:
                    saved.write_text(json.dumps(calls))
            elif args.reproduce:
                checks[name] = reproduced(server.url, calls, args.new_tokens)
            # position_only learns nothing: all questions at once (the rest learn online)
            streams = len({c["question"] for c in calls}) if config.get("position_only") \
                else args.streams
            scored[name] = score(calls, run_mode(
                server.url, name, calls, args.new_tokens, streams,
                config.get("question_base") == "neutral"))
        write(args, modes, scored, checks, started)     # after every mode: a partial result


def server_config(config: dict) -> dict:
    """A mode's KVCOMM_CONFIG: its keys less the client's own (``CLIENT_KEYS``)."""
    return {k: v for k, v in config.items() if k not in CLIENT_KEYS}


def write(args, modes: dict, scored: dict, checks: dict, started: float) -> dict:
    result = {
        "device": "CPU (2 cores), SmolLM2-135M-Instruct bf16, kvcomm-sglang serve --device cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "questions": len({r["question"] for r in next(iter(scored.values()))}),
        "new_tokens": args.new_tokens, "warmup": args.warmup,
        "streams": args.streams,
        "agents": [t.agent for t in templates()], "judge_agent": judge_agent(),
        "seconds": round(time.time() - started),
        "noise_floor": noise_floor(next(iter(scored.values()))),
        "modes_planned": list(modes),
        "modes": {name: {"config": modes[name], **summarize_mode(rows, args.warmup)}
                  for name, rows in scored.items()},
        "paired": paired(scored),
        "reference_reproduced": checks,
        "calls": scored,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {out}", flush=True)
    return result


def print_table(result: dict) -> None:
    cols = ("agent_reuse_rate", "same_calls", "first_token_agreement", "first8_agreement",
            "answer_agreement", "verdict_agreement", "judge_consistency")
    floor = result["noise_floor"]
    print(f"\n{result['questions']} questions, {len(result['agents'])} agents "
          f"(judge = agent {result['judge_agent']}), {result['new_tokens']} tokens; noise floor "
          f"(dense vs dense, another prefill split, {floor['calls']} calls): first token "
          f"{floor['first_token_agreement']:.3f}, answer {floor['answer_agreement']:.3f}")
    print(f"{'mode':<20}" + "".join(f"{c[:16]:>18}" for c in cols))
    for name, m in result["modes"].items():
        cells = []
        for c in cols:
            value, ci = m.get(c), m["ci95"].get(c)
            cells.append("-" if value is None else f"{value}" if c == "same_calls" else
                         f"{value:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else ""))
        print(f"{name:<20}" + "".join(f"{x:>18}" for x in cells))
    print(json.dumps(result["paired"], indent=1))


if __name__ == "__main__":
    main()
