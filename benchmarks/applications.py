"""Anchors warm from a workflow's first question, on the CPU server (issue 16, item 4).

1. ``warm``: one workflow of an application answers ``--warm`` questions (the 3-agent workflow of
   tests/harness, through /generate with KVCOMM hints).
2. ``at_once``: ``--workflows`` new workflows of that application start together (one thread
   each), each with one new question; ``baseline``: the same questions in as many new workflows
   without an application (each its own, the protocol before applications), also at once.
   Reuse = agent calls served by reuse / agent calls; each workflow's template passes and base
   request are on its clock (``wall_s``). Every agent call is also sent without hints (same ids,
   same server, a plain namespace, right after it): ``agree`` = reused calls whose greedy answer
   equals the dense one (``first_token_agree``: its first token); ``dense_calls_agree`` = the
   same for calls KVCOMM computed densely, which shows how far batching alone moves answers
   (the workflows run concurrently, so a call and its comparison share batches with others).
   ``continued``: for comparison, the warm-up workflow itself goes on with as many other new
   questions, one after another (reuse within one workflow, as before applications), its calls
   compared with dense the same way.
3. ``restart``: the server saved the application (``--kvcomm-anchor-path``) when it fell idle;
   it stops, a new server starts with the same directory, and one new workflow of the
   application answers one question (the first unused one no longer than those asked before:
   an anchor vouches only for content no longer than itself): its calls' modes, with nothing
   warmed in that server.

Writes docs/perf/applications_cpu.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import secrets
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang.runtime_patch.process import ServerProcess  # noqa: E402
from tests.harness import workflow  # noqa: E402
from tests.server.workflow_client import Workflow, encode  # noqa: E402


def run_workflow(url: str, qid: str, question: str, application: str | None, new_tokens: int,
                 dense: bool) -> dict:
    """One new workflow answering one question; -> its calls and its wall time."""
    start = time.perf_counter()
    wf = Workflow(url, qid, new_tokens, application=application)
    calls = wf.run(qid, question, dense_url=url if dense else None)
    return {"question": qid, "wall_s": round(time.perf_counter() - start, 3),
            "calls": [call_row(agent, r, d, n) for agent, r, d, n in calls]}


def continued(wf: Workflow, questions, i: int) -> dict:
    """Question i in an existing workflow ``wf``, each call compared with dense."""
    start = time.perf_counter()
    calls = wf.run(f"c{i}", questions[i], dense_url=wf.url)
    return {"question": f"c{i}", "wall_s": round(time.perf_counter() - start, 3),
            "calls": [call_row(agent, r, d, n) for agent, r, d, n in calls]}


def call_row(agent, r, d, n) -> dict:
    return {"agent": agent, "mode": r.kvcomm["mode"], "reason": r.kvcomm["fallback_reason"],
            "reused_tokens": r.kvcomm["reused_tokens"], "prompt_tokens": n,
            "agrees": None if d is None else r.output_ids == d.output_ids,
            "first_agrees": None if d is None else r.output_ids[:1] == d.output_ids[:1]}


def at_once(url: str, questions: dict, application: str | None, new_tokens: int,
            dense: bool = True) -> list[dict]:
    """New workflows started together, one thread and one question each."""
    out, errors = {}, []

    def one(qid, question):
        try:
            out[qid] = run_workflow(url, qid, question, application, new_tokens, dense)
        except Exception as exc:            # reported below: a benchmark must not hide a fault
            errors.append(f"{qid}: {exc!r}")

    threads = [threading.Thread(target=one, args=item) for item in questions.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return [out[qid] for qid in questions]


def summary(runs: list[dict]) -> dict:
    calls = [c for run in runs for c in run["calls"]]
    reused = [c for c in calls if c["mode"] == "reuse"]
    checked = [c for c in reused if c["agrees"] is not None]
    dense = [c for c in calls if c["mode"] == "dense" and c["agrees"] is not None]
    firsts = [run["calls"][0]["mode"] == "reuse" for run in runs]
    return {"workflows": len(runs), "calls": len(calls), "reused_calls": len(reused),
            "reuse_rate": round(len(reused) / max(len(calls), 1), 3),
            "first_calls_reused": sum(firsts),
            "reused_tokens": sum(c["reused_tokens"] for c in calls),
            "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
            "agree": f"{sum(c['agrees'] for c in checked)}/{len(checked)}",
            "first_token_agree": f"{sum(c['first_agrees'] for c in checked)}/{len(checked)}",
            "dense_calls_agree": f"{sum(c['agrees'] for c in dense)}/{len(dense)}",
            "median_wall_s": sorted(r["wall_s"] for r in runs)[len(runs) // 2] if runs else None,
            "fallbacks": sorted({c["reason"] for c in calls if c["reason"]})}


def restart_question(questions, used: int) -> int:
    """The first unused question no longer (in tokens) than the longest one asked before: an
    anchor vouches only for content no longer than itself, and the restart arm measures the
    restore, not that rule."""
    longest = max(len(encode(q)) for q in questions[:used])
    return next(i for i in range(used, len(questions)) if len(encode(questions[i])) <= longest)


def wait_saved(path: pathlib.Path, since: float, timeout: float = 60.0) -> dict:
    """The saved application's meta once a save newer than ``since`` (time.time()) is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for meta in path.glob("*.json"):
            info = json.loads(meta.read_text())
            if info["saved_at"] >= since:
                return info
        time.sleep(0.5)
    raise TimeoutError(f"no application saved in {path} within {timeout:.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=6, help="questions of the warm-up workflow")
    parser.add_argument("--workflows", type=int, default=8, help="new workflows started at once")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", default="docs/perf/applications_cpu.json")
    args = parser.parse_args(argv)
    qs = workflow.QUESTIONS
    needed = args.warm + 2 * args.workflows + 1
    if needed > len(qs):
        parser.error(f"--warm + --workflows + 1 = {needed} questions; there are {len(qs)}")
    fresh = {f"q{i}": qs[i] for i in range(args.warm, args.warm + args.workflows)}
    anchor_dir = pathlib.Path(tempfile.mkdtemp(prefix="kvcomm-anchors-"))
    app = secrets.token_urlsafe(16)
    result = {"device": "cpu (2 cores shared)", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                    time.gmtime()),
              "model": "SmolLM2-135M-Instruct", "new_tokens": args.new_tokens, "warm": args.warm,
              "command": "python benchmarks/applications.py " + " ".join(argv or sys.argv[1:])}
    server_args = ["--device", "cpu", "--kvcomm-anchor-path", str(anchor_dir)]
    with ServerProcess(server_args) as server:
        warm = Workflow(server.url, "warm", args.new_tokens, application=app)
        result["warm_runs"] = [[c[1].kvcomm["mode"] for c in warm.run(f"w{i}", qs[i])]
                               for i in range(args.warm)]
        started = time.time()
        result["at_once"] = summary(at_once(server.url, fresh, app, args.new_tokens))
        result["baseline"] = summary(at_once(server.url, fresh, None, args.new_tokens))
        result["continued"] = summary([continued(warm, qs, args.warm + args.workflows + i)
                                       for i in range(args.workflows)])
        result["saved"] = wait_saved(anchor_dir, started)
    restart_q = restart_question(qs, args.warm + 2 * args.workflows)
    with ServerProcess(server_args) as server:
        run = run_workflow(server.url, f"r{restart_q}", qs[restart_q], app, args.new_tokens, True)
        result["restart"] = summary([run]) | {"modes": [c["mode"] for c in run["calls"]]}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"warm-up modes: {result['warm_runs']}")
    for name in ("at_once", "baseline", "continued", "restart"):
        s = result[name]
        print(f"{name:>9}: {s['reused_calls']}/{s['calls']} calls reused ({s['reuse_rate']:.0%}), "
              f"first calls reused {s['first_calls_reused']}/{s['workflows']}, "
              f"agree {s['agree']} (first token {s['first_token_agree']}; dense calls "
              f"{s['dense_calls_agree']}), median workflow {s['median_wall_s']} s, "
              f"fallbacks {s['fallbacks']}")
    return result


if __name__ == "__main__":
    main()
