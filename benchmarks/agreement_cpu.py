"""Greedy agreement of KVCOMM with dense prefill inside the real CPU server, on the question set.

The 3-agent workflow (tests/harness) runs through /generate with KVCOMM hints; every agent call is
also sent without hints (dense, same input_ids, same server). Anchors are learned online in
question order. Agreement of the reused calls with dense: the first token, the first 8 tokens,
the whole answer (``--new-tokens``), and the verdict (both contain the expected answer, or
neither). Writes bench-results/agreement_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcomm_sglang.runtime_patch.process import ServerProcess  # noqa: E402
from tests.harness import workflow  # noqa: E402
from tests.server.workflow_client import Workflow, tokenizer  # noqa: E402


def correct(output_ids, question: int) -> bool:
    """The answer text contains the expected answer (as benchmarks/quality.py scores it)."""
    text = tokenizer().decode(output_ids, skip_special_tokens=True)
    return workflow.ANSWERS[question].lower() in text.lower()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(workflow.QUESTIONS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--url")
    parser.add_argument("--out", default="bench-results/agreement_cpu.json")
    parser.add_argument("--config", default=None,
                        help="KVCOMM_CONFIG of the started server (JSON), e.g. "
                             "'{\"recompute_last_piece\": false}' for the official one-token tail")
    args = parser.parse_args(argv)
    env = {"KVCOMM_CONFIG": args.config} if args.config else None
    server = None if args.url else ServerProcess(["--device", "cpu"], env=env)
    if server:
        server.__enter__()
    try:
        url = args.url or server.url
        wf = Workflow(url, f"agree-{int(time.time())}", max_new_tokens=args.new_tokens)
        calls = []
        for i in range(args.questions):
            for agent, r, d, n in wf.run(f"q{i}", workflow.QUESTIONS[i], dense_url=url):
                calls.append({"question": i, "agent": agent, "prompt_tokens": n, **r.kvcomm,
                              "agree": r.output_ids == d.output_ids,
                              "first_token_agree": r.output_ids[:1] == d.output_ids[:1],
                              "prefix8_agree": r.output_ids[:8] == d.output_ids[:8],
                              "verdict_agree": correct(r.output_ids, i) == correct(d.output_ids, i),
                              "kvcomm_correct": correct(r.output_ids, i),
                              "dense_correct": correct(d.output_ids, i)})
            print(f"\r{i + 1}/{args.questions}", end="", file=sys.stderr, flush=True)
    finally:
        if server:
            server.stop()
    reused = [c for c in calls if c["mode"] == "reuse"]
    after = [c for c in calls if c["question"] >= 2]

    def share(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    result = {
        "config": args.config or "default",
        "questions": args.questions, "calls": len(calls), "reused_calls": len(reused),
        "agent_reuse_rate_after_warmup": len([c for c in after if c["mode"] == "reuse"]) / max(len(after), 1),
        "answer_agreement_reused": share(reused, "agree"),
        "first_token_agreement_reused": share(reused, "first_token_agree"),
        "first_8_tokens_agreement_reused": share(reused, "prefix8_agree"),
        "verdict_agreement_reused": share(reused, "verdict_agree"),
        "kvcomm_correct_reused": share(reused, "kvcomm_correct"),
        "dense_correct_reused": share(reused, "dense_correct"),
        "answer_agreement_all": share(calls, "agree"),
        "fallbacks": {r: sum(c["fallback_reason"] == r for c in calls)
                      for r in sorted({c["fallback_reason"] for c in calls if c["fallback_reason"]})},
        "calls_detail": calls,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{json.dumps({k: v for k, v in result.items() if k != 'calls_detail'}, indent=2)}")


if __name__ == "__main__":
    main()
