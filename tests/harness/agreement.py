"""Same-call agreement of a mode's answers with dense answers, with 95 % bootstrap intervals.

One row per call: the mode answered the very prompt dense answered (same ids), so a difference
belongs to that call. Measures (shares of calls):

  first_token_agreement   the first generated token equals dense's
  first8_agreement        the first 8 generated tokens equal dense's
  answer_agreement        the whole greedy answer equals dense's (same token ids)
  verdict_agreement       both answers contain the expected answer, or neither (workflow agents)
  judge_consistency       the judge picks the same agent as under dense (judge calls only)

Intervals: percentile bootstrap over calls (2000 resamples, fixed seed), so reruns print the
same interval for the same rows.
"""

from __future__ import annotations

import random

MEASURES = ("first_token_agreement", "first8_agreement", "answer_agreement",
            "verdict_agreement", "judge_consistency")
BOOTSTRAP_REPS = 2000


def compare(ids: list[int], dense_ids: list[int], texts: tuple[str, str], expected: str,
            judge: bool, pick=None) -> dict:
    """One call's row: ``ids`` vs ``dense_ids`` (their decoded ``texts``); a judge call
    (``pick(text) -> label``) scores judge consistency instead of the verdict."""
    row = {"first_token_agreement": ids[:1] == dense_ids[:1],
           "first8_agreement": ids[:8] == dense_ids[:8],
           "answer_agreement": ids == dense_ids}
    if judge:
        row["judge_consistency"] = pick(texts[0]) == pick(texts[1])
    else:
        hit = [expected.lower() in t.lower() for t in texts]
        row["verdict_agreement"] = hit[0] == hit[1]
    return row


def share(values) -> float | None:
    values = [bool(v) for v in values]
    return sum(values) / len(values) if values else None


def bootstrap_ci(values, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the mean of ``values`` (numbers or bools)."""
    values = [float(v) for v in values]
    if not values:
        return None
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(reps))
    return [means[int(0.025 * (reps - 1))], means[int(0.975 * (reps - 1))]]


def summarize(rows: list[dict]) -> dict:
    """Every measure over the rows that have it, with ``ci95`` {measure: [lo, hi]} and the
    row counts (``same_calls``; judge calls counted apart)."""
    out = {"same_calls": len(rows),
           "judge_calls": sum("judge_consistency" in r for r in rows)}
    ci = {}
    for name in MEASURES:
        values = [r[name] for r in rows if name in r]
        out[name] = share(values)
        ci[name] = bootstrap_ci(values)
    out["ci95"] = ci
    return out


def paired_difference(rows: list[dict], other: list[dict], name: str) -> dict | None:
    """Mean of (row - other row) for ``name`` over calls both have (rows aligned by call key
    ``call``), with its 95 % bootstrap interval: does one mode beat another on the same calls?"""
    theirs = {r["call"]: r for r in other if name in r}
    diffs = [float(r[name]) - float(theirs[r["call"]][name]) for r in rows
             if name in r and r["call"] in theirs]
    if not diffs:
        return None
    return {"difference": sum(diffs) / len(diffs), "ci95": bootstrap_ci(diffs),
            "calls": len(diffs)}


def mean_of(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None
