"""Summarize torch-profiler chrome traces (SGLang's /start_profile, /stop_profile) as text.

    python benchmarks/gpu/trace_summary.py TRACE.json.gz [...] [--json OUT.json]

Per trace: the span of the recorded events; GPU busy time (union of kernel, memcpy and memset
intervals) and the GPU idle time inside the span; every ``kvcomm.*`` annotation (the runtime's
record_function ranges: plan, materialize, flatten, kernel, capture); the top GPU kernels, CUDA
runtime calls (graph launches, synchronizations) and host ops / annotations (SGLang's
``step[EXTEND ...]``, ``scheduler.*``; inclusive times) by total time. What it answers:
where the time of one request's prefill goes, host work or GPU work.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: pathlib.Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def top(events: list[dict], n: int) -> list[dict]:
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": name, "count": c, "total_ms": t / 1e3} for name, (c, t) in rows]


def summarize(events: list[dict], n: int = 12) -> dict:
    cats = collections.defaultdict(list)
    for e in events:
        cats[e.get("cat", "")].append(e)
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    gpu = [e for c in GPU_CATS for e in cats[c]]
    busy = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    annotations = [{"name": e["name"], "ms": e["dur"] / 1e3, "at_ms": (e["ts"] - start) / 1e3}
                   for e in sorted(cats["user_annotation"], key=lambda e: e["ts"])
                   if e["name"].startswith("kvcomm.")]
    return {
        "span_ms": (end - start) / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "gpu_idle_in_span_ms": (end - start - busy) / 1e3,
        "kernels": len(cats["kernel"]),
        "kvcomm_annotations": annotations,
        "top_kernels": top(cats["kernel"], n),
        "top_cuda_runtime": top(cats["cuda_runtime"], n),
        "top_host_ops": top(cats["cpu_op"] + cats["user_annotation"], n),
    }


def print_summary(name: str, s: dict) -> None:
    print(f"\n== {name}: span {s['span_ms']:.2f} ms, GPU busy {s['gpu_busy_ms']:.2f} ms "
          f"({s['kernels']} kernels), GPU idle in span {s['gpu_idle_in_span_ms']:.2f} ms")
    for a in s["kvcomm_annotations"]:
        print(f"   {a['name']:<22} {a['ms']:8.3f} ms   at {a['at_ms']:8.2f} ms")
    for title, key in (("GPU kernels", "top_kernels"), ("CUDA runtime", "top_cuda_runtime"),
                       ("host ops and annotations, inclusive", "top_host_ops")):
        if not s[key]:
            continue
        print(f"   {title} (total ms, count):")
        for r in s[key]:
            print(f"     {r['total_ms']:9.3f} {r['count']:6d}  {r['name'][:100]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=pathlib.Path)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    out = {}
    for path in args.traces:
        events = load(path)
        if not events:
            print(f"{path}: no complete events", file=sys.stderr)
            continue
        out[str(path)] = summarize(events, args.top)
        print_summary(path.name, out[str(path)])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
