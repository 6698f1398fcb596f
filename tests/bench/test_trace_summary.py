"""benchmarks/gpu/trace_summary.py on a hand-made chrome trace (the GPU profile's reader)."""

import gzip
import json

from benchmarks.gpu.trace_summary import busy_us, load, summarize


def test_busy_time_is_the_union_of_intervals():
    assert busy_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert busy_us([]) == 0


def test_summary_of_a_trace(tmp_path):
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "kvcomm.materialize", "ts": 100, "dur": 500},
        {"ph": "X", "cat": "user_annotation", "name": "step[EXTEND bs=1 toks=1]", "ts": 700,
         "dur": 300},
        {"ph": "X", "cat": "kernel", "name": "_materialize_kernel", "ts": 300, "dur": 250},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 800, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 850, "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 750, "dur": 20},
        {"ph": "i", "cat": "instant", "name": "ignored", "ts": 0},
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(load(path))
    assert s["span_ms"] == 0.9 and s["gpu_busy_ms"] == 0.4 and s["kernels"] == 3
    assert [a["name"] for a in s["kvcomm_annotations"]] == ["kvcomm.materialize"]
    assert s["top_kernels"][0] == {"name": "_materialize_kernel", "count": 1, "total_ms": 0.25}
    assert s["top_kernels"][1] == {"name": "gemm", "count": 2, "total_ms": 0.2}
    assert s["top_cuda_runtime"][0]["name"] == "cudaGraphLaunch"
