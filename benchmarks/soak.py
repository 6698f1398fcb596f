"""Soak a KVCOMM server: N concurrent multi-agent workflows for --duration seconds, with aborted
streams, plain and hostile requests interleaved, on a small KV pool (tree and store eviction,
decode retraction), chunked prefill, SGLang's strict idle memory check and KVCOMM's invariant
checker on. Prints a table, writes --json PATH, exits 1 when anything went wrong:

    python benchmarks/soak.py --duration 120 --json bench-results/soak.json
    python benchmarks/soak.py --url http://127.0.0.1:30000 --server-log server.log \\
        --device cuda --duration 60 --json "$OUT/soak-gpu.json"         # a server of your own

Without --url it starts ``kvcomm-sglang serve`` (ServerProcess) with --enable-metrics, a
--max-total-tokens pool, --chunked-prefill-size, --schedule-conservativeness,
SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1 and KVCOMM_CONFIG=--kvcomm-config. With --url,
start that server with the same flags yourself. Every KVCOMM metric the verdict reads must be on
/metrics (a missing one fails the run), and the invariant checker must have run.

The defaults put pressure first: a 1500-token pool holds the running requests and little else,
so the store is evicted all the time. The workflows share ``--applications`` applications, whose
templates and anchors outlive any one workflow, and the entropy gate is off (γ = 1), so the
reuse path (load-back under aborts, chunked prefill of reused requests, eviction of what a plan
reads) runs under that pressure: the soak tests safety, not the gate's choices.
Faults: 5xx, cut streams and refused or hanging connections (errors_5xx), a 4xx on a valid
request (unexpected_4xx), a 200 on a request that must be refused (hostile_not_refused).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import secrets
import pathlib
import sys
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.soak_client import by_label, parse_metrics, total  # noqa: E402
from benchmarks.soak_traffic import HOSTILE, Tally, WorkflowLoop  # noqa: E402
from benchmarks.ttft_gpu import device_name  # noqa: E402
from kvcomm_sglang.runtime_patch.process import ServerProcess  # noqa: E402
from tests.server.conftest import LEAK_MARKERS  # noqa: E402

REQUIRED_METRICS = ("kvcomm_invariant_checks_total", "kvcomm_invariant_violations_total",
                    "kvcomm_lost_anchors", "kvcomm_leaked_slots", "kvcomm_store_bytes",
                    "kvcomm_store_budget_bytes")
TRAFFIC_FAULTS = ("errors_5xx", "unexpected_4xx", "hostile_not_refused")   # Tally.faults
ZERO_COUNTS = ("invariant_violations", "lost_anchors", "leaked_slots", "idle_leak_reports",
               *TRAFFIC_FAULTS)
SERVER_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=120, help="seconds of load")
    p.add_argument("--workflows", type=int, help="concurrent workflows (8 on cpu, 32 on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--url", help="soak this running server instead of starting one")
    p.add_argument("--server-log", help="its log (needed with --url: the idle leak check)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--max-total-tokens", type=int, default=1500, help="KV pool of the server")
    p.add_argument("--chunked-prefill-size", type=int, default=32)
    p.add_argument("--schedule-conservativeness", type=float, default=0.05,
                   help="SGLang's admission reserve for decode; near 0 it packs the pool, so "
                        "decode runs out of memory and requests are retracted")
    p.add_argument("--kvcomm-config", default='{"debug_invariants": true, "gamma": 1.0}')
    p.add_argument("--prefix-tokens", type=int, default=16, help="agent system prefix")
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=48,
                   help="tokens of each agent's answer (decode growth: retraction)")
    p.add_argument("--applications", type=int, default=2,
                   help="the workflows share this many applications (templates and anchors); "
                        "0: every workflow is its own application")
    p.add_argument("--questions-per-workflow", type=int, default=4,
                   help="then the thread opens a fresh namespace")
    p.add_argument("--extra-rate", type=float, default=0.5,
                   help="chance of an aborted, plain or hostile request before each agent call")
    p.add_argument("--hostile", nargs="+", choices=sorted(HOSTILE), default=sorted(HOSTILE))
    p.add_argument("--vocab-max", type=int, default=32000, help="token ids drawn below this")
    p.add_argument("--idle-s", type=float, default=8, help="idle time before the leak check")
    p.add_argument("--metrics-every-s", type=float, default=2.0)
    p.add_argument("--timeout-s", type=float, default=300, help="per request")
    p.add_argument("--startup-timeout-s", type=float, default=900,
                   help="for the server to answer /health (a busy 2-core machine needs minutes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.url and not args.server_log:
        p.error("with --url, --server-log is needed: the idle leak check reads the server's log")
    args.workflows = args.workflows or (32 if args.device == "cuda" else 8)
    return args


def server_args(args) -> list[str]:
    return ["--device", args.device, "--enable-metrics",
            "--max-total-tokens", str(args.max_total_tokens),
            "--chunked-prefill-size", str(args.chunked_prefill_size),
            "--schedule-conservativeness", str(args.schedule_conservativeness)]


def read_metrics(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        return parse_metrics(resp.read().decode())


class StoreSampler(threading.Thread):
    """Reads kvcomm_store_bytes every ``every_s`` seconds until stopped; keeps the maximum."""

    def __init__(self, url: str, every_s: float):
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.max_bytes, self.samples, self.failed = 0, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                value = total(read_metrics(self.url), "kvcomm_store_bytes")
            except OSError:
                self.failed += 1
                continue
            self.samples += 1
            self.max_bytes = max(self.max_bytes, value or 0)


def run_load(url: str, args) -> tuple[Tally, StoreSampler]:
    tally, sampler = Tally(), StoreSampler(url, args.metrics_every_s)
    deadline = time.monotonic() + args.duration
    apps = [(a, secrets.token_urlsafe(16)) for a in range(args.applications)]
    loops = [threading.Thread(target=WorkflowLoop(url, i, args, tally, deadline,
                                                  apps[i % len(apps)] if apps else (i, "")).run,
                              name=f"workflow-{i}", daemon=True) for i in range(args.workflows)]
    sampler.start()
    for thread in loops:
        thread.start()
    for thread in loops:
        thread.join()
    sampler.stopped.set()
    sampler.join()
    return tally, sampler


def server_health(url: str, log_path) -> dict:
    """After the idle wait: is the server alive, and what did SGLang's idle check report."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as resp:
            alive = resp.status == 200
    except OSError:
        alive = False
    lines = pathlib.Path(log_path).read_text(errors="replace").splitlines()
    leaks = [line for line in lines if any(m in line.lower() for m in LEAK_MARKERS)]
    return {"server_alive": alive, "idle_leak_reports": len(leaks), "idle_leak_lines": leaks[:5]}


def metric_counts(samples: dict, sampler: StoreSampler) -> dict:
    """The verdict's numbers from the final /metrics (None for a metric the server lacks)."""
    store = total(samples, "kvcomm_store_bytes")
    return {"invariant_checks": total(samples, "kvcomm_invariant_checks_total"),
            "invariant_violations": total(samples, "kvcomm_invariant_violations_total"),
            "invariant_violations_by_check": by_label(
                samples, "kvcomm_invariant_violations_total", "check"),
            "lost_anchors": total(samples, "kvcomm_lost_anchors"),
            "leaked_slots": total(samples, "kvcomm_leaked_slots"),
            "max_store_bytes": max(sampler.max_bytes, store) if store is not None else None,
            "budget_bytes": total(samples, "kvcomm_store_budget_bytes"),
            "fallbacks": by_label(samples, "kvcomm_fallbacks_total", "reason"),
            "missing_metrics": [m for m in REQUIRED_METRICS if m not in samples],
            "store_samples": sampler.samples, "store_sample_failures": sampler.failed}


def traffic_counts(tally: Tally) -> dict:
    agent_calls = sum(tally.modes.values())
    statuses: dict = {}
    for (category, status), n in sorted(tally.statuses.items(), key=str):
        statuses.setdefault(category, {})[str(status)] = n
    return {"requests": tally.count(), **{key: tally.faults[key] for key in TRAFFIC_FAULTS},
            "p50_ttft_s": percentile(tally.ttfts, 0.50),
            "p99_ttft_s": percentile(tally.ttfts, 0.99),
            "agent_calls": agent_calls, "reuse_rate": tally.modes["reuse"] / max(agent_calls, 1),
            "aborted": tally.count("abort"), "plain": tally.count("plain"),
            "hostile": tally.count("hostile:"), "retractions": tally.retractions,
            "namespaces": tally.namespaces, "questions": tally.questions,
            "statuses": statuses, "fault_examples": tally.examples}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def failures(result: dict) -> list[str]:
    """Why the run failed (empty: it passed). A metric the server lacks fails it too."""
    out = [f"metric {m} is missing from /metrics" for m in result["missing_metrics"]]
    out += [f"{key} = {result[key]}" for key in ZERO_COUNTS if result[key]]
    if result["invariant_checks"] == 0:
        out.append("the invariant checker never ran (KVCOMM_CONFIG debug_invariants is off?)")
    if not result["server_alive"]:
        out.append("the server is not alive after the load")
    store, budget = result["max_store_bytes"], result["budget_bytes"]
    if store is not None and budget is not None and store > budget:
        out.append(f"store bytes {store:.0f} exceed the budget {budget:.0f}")
    if result["agent_calls"] == 0:
        out.append("no agent call was answered: the soak measured nothing")
    return out


def soak(url: str, log_path, args) -> dict:
    """Load, idle, then read the metrics and the log: the whole result."""
    started = time.monotonic()
    tally, sampler = run_load(url, args)
    load_s = time.monotonic() - started
    time.sleep(args.idle_s)
    health = server_health(url, log_path)
    try:
        counts = metric_counts(read_metrics(url), sampler)
    except OSError as exc:
        counts = metric_counts({}, sampler) | {"metrics_error": str(exc)}
    result = {"device": device_name() if args.device == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "duration_s": args.duration, "load_s": round(load_s, 1),
              "workflows": args.workflows, "applications": args.applications,
              "server": url if args.url else server_args(args),
              "kvcomm_config": None if args.url else args.kvcomm_config,
              "server_log": str(log_path),
              **traffic_counts(tally), **counts, **health}
    result["failures"] = failures(result)
    return result


def print_table(result: dict) -> None:
    rows = [("requests", "requests"), ("agent calls", "agent_calls"), ("reuse rate", "reuse_rate"),
            ("questions", "questions"), ("namespaces", "namespaces"), ("aborted", "aborted"),
            ("plain", "plain"), ("hostile", "hostile"), ("retractions", "retractions"),
            ("p50 TTFT s", "p50_ttft_s"), ("p99 TTFT s", "p99_ttft_s"),
            ("max store bytes", "max_store_bytes"), ("store budget bytes", "budget_bytes"),
            ("invariant checks", "invariant_checks")]
    rows += [(key.replace("_", " "), key) for key in ZERO_COUNTS]
    print(f"\nsoak: {result['workflows']} workflows, {result['load_s']} s on {result['device']}")
    for label, key in rows:
        print(f"  {label:<22} {_shown(result[key]):>12}")
    print(f"  fallbacks: {json.dumps(result['fallbacks'])}\n  server log: {result['server_log']}")
    print("PASS" if not result["failures"] else "FAIL:\n  " + "\n  ".join(result["failures"]))


def _shown(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def start_server(args) -> ServerProcess | None:
    """``kvcomm-sglang serve`` with the soak's flags (stopped on exit, Ctrl-C and SIGTERM)."""
    env = {**SERVER_ENV, "KVCOMM_CONFIG": args.kvcomm_config}
    server = ServerProcess(server_args(args), env=env, startup_timeout=args.startup_timeout_s)
    try:
        return server.__enter__()
    except (RuntimeError, TimeoutError) as exc:
        print(f"FAIL: the server did not start: {exc}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    server = None if args.url else start_server(args)
    if not args.url and server is None:
        return 1
    try:
        result = soak(args.url or server.url, args.server_log or server.log_path, args)
    finally:
        if server:
            server.stop()
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
