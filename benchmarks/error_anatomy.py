"""Where the reused KV's error sits, and how many anchors the weights really mix (oracle).

The KVCOMM run of ``benchmarks/quality.py`` on dense's prompts (same calls); for every reused
call, against a dense prefill of the same ids (layers >= 1): the squared K and V error per token,
summed by the token's offset inside its piece (0, 1, 2, 3, 4-7, 8+) and by the piece's kind, and
the weights' effective anchor count 1 / sum(w^2) (per content token, per template channel),
with the position-only assembly of the same call for comparison. Writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang.config import KVCommConfig  # noqa: E402
from tests.harness import hf_model, workflow  # noqa: E402
from tests.harness.runner import WorkflowRunner  # noqa: E402

BUCKETS = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 8), (8, 10 ** 9))


class AnatomyRunner(WorkflowRunner):
    """The kvcomm runner, recording every reused call's error by token before decoding."""

    records: list

    def _refresh(self, layout, plan, needed, agent, kv, end: int):
        ref = self.hf.prefill(layout.token_ids)
        plain = self.state.assemble(agent, needed, None)
        self.records.append({"agent": agent, **anatomy(layout, kv, plain, (ref.k, ref.v), end),
                             **effective_anchors(plan)})
        return super()._refresh(layout, plan, needed, agent, kv, end)


def anatomy(layout, kv, plain, ref, end: int) -> dict:
    """Squared error (layers >= 1) of the corrected and the position-only KV, by bucket."""
    out = {"tokens": defaultdict(int)}
    for piece in layout.pieces[1:]:
        for lo, hi in BUCKETS:
            out["tokens"][f"{piece.kind}:{lo}"] += max(0, min(piece.start + hi, piece.end, end)
                                                      - piece.start - lo)
    for label, (k, v) in (("kvcomm", kv), ("position_only", plain)):
        err = sum((x[1:, :end] - r[1:, :end]).double().pow(2).sum(dim=(0, 2, 3))
                  for x, r in ((k, ref[0]), (v, ref[1])))
        table = defaultdict(float)
        for piece in layout.pieces[1:]:
            for lo, hi in BUCKETS:
                span = slice(piece.start + lo, min(piece.start + hi, piece.end, end))
                table[f"{piece.kind}:{lo}"] += float(err[span].sum())
        out[label] = dict(table)
    out["reference_norm2"] = float(sum(r[1:, layout.prefix_length:end].double().pow(2).sum()
                                       for r in ref))
    return out


def effective_anchors(plan) -> dict:
    """Mean 1 / sum_a w_a^2 of the content token weights and of the template channel weights."""
    out = {"content": [], "template": [], "anchors": []}
    for piece in plan.pieces:
        if piece.anchors:
            w = piece.weights_k.double()
            out[piece.kind].append(float((1 / w.pow(2).sum(0)).mean()))
            out["anchors"].append(len(piece.anchors))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(workflow.QUESTIONS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench-results/error_anatomy.json")
    args = parser.parse_args(argv)
    hf = hf_model.load_model()
    questions = workflow.QUESTIONS[: args.questions]
    dense = WorkflowRunner(hf, "dense", max_new_tokens=args.new_tokens, judge=True)
    for i, q in enumerate(questions):
        dense.run_question(i, q)
    runner = AnatomyRunner(hf, "kvcomm", KVCommConfig(), max_new_tokens=args.new_tokens,
                           judge=True)
    runner.records = []
    for i, q in enumerate(questions):
        runner.run_question(i, q, dense.generations)
    result = {"questions": len(questions), "new_tokens": args.new_tokens,
              "calls": runner.records, "summary": summarize(runner.records)}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


def summarize(records: list) -> dict:
    """Shares of the total squared error by bucket, both assemblies; mean effective anchors."""
    out = {}
    tokens = defaultdict(int)
    for r in records:
        for key, value in r["tokens"].items():
            tokens[key] += value
    out["token_share"] = {k: round(v / sum(tokens.values()), 4) for k, v in sorted(tokens.items())}
    for label in ("kvcomm", "position_only"):
        total = defaultdict(float)
        for r in records:
            for key, value in r[label].items():
                total[key] += value
        whole = sum(total.values())
        out[label] = {k: round(v / whole, 4) for k, v in sorted(total.items())}
        out[f"{label}_relative_error"] = (whole / sum(r["reference_norm2"] for r in records)) ** .5
    for kind in ("content", "template", "anchors"):
        values = [x for r in records for x in r[kind]]
        out[f"effective_{kind}" if kind != "anchors" else "mean_anchors"] = (
            sum(values) / len(values) if values else None)
    return out


if __name__ == "__main__":
    main()
