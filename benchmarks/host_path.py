"""Host-side cost of the reuse path in the server's runtime, on the paper's workload shape.

The GPU TTFT run reports per reused call ``plan_ms`` (KVCommRuntime.decide: prompt checks and
planning) and ``materialize_ms`` (from_reuse_plan, validation, the kernel); most of it is Python
on the host. This drives the real runtime with SGLang's own pools through the paper's
workload (5 fully connected agents, 536-token x0, 1024-token input, 511-token messages;
``benchmarks/ttft_gpu.Workload``), without a server: on the CPU with a tiny KV (2 layers, 2
heads, head dim 8), so that host work can be iterated on without a GPU, or on a GPU with
Llama-3.1-8B's KV shape (``--device cuda --shape llama8b``: the Triton matcher and kernel, the
server's synchronized ``plan_ms`` / ``materialize_ms``). Per agent: median ms of ``decide``, of
``from_reuse_plan``, of the runtime's own plan and materialize times over the timed workflows
(wall time on a shared CPU: noisy, ±50 % between runs), the number of torch calls decide and
flatten make (``tests.torch_calls.TorchCalls``, one more workflow: the stable proxy, since on the
GPU host every torch call costs microseconds of dispatch and launch), then cProfile's top
functions of both.

    python benchmarks/host_path.py [--warmup 3] [--workflows 5] [--top 25]
    python benchmarks/host_path.py --device cuda --shape llama8b      # on the GPU machine
"""

from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import statistics
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

from benchmarks.kernels import load_module  # noqa: E402
from benchmarks.ttft_gpu import Workload  # noqa: E402
from kvcomm_sglang import protocol  # noqa: E402
from kvcomm_sglang.config import KVCommConfig  # noqa: E402
from kvcomm_sglang.kernels import plan as plan_module  # noqa: E402
from kvcomm_sglang.rope import RopeSpec  # noqa: E402
from kvcomm_sglang.runtime_patch import runtime as runtime_module  # noqa: E402
from kvcomm_sglang.runtime_patch.runtime import KVCommRuntime  # noqa: E402
from tests.torch_calls import TorchCalls  # noqa: E402

POOL_TOKENS = 400_000
SHAPES = {"tiny": (2, 2, 8, torch.float32, POOL_TOKENS),       # layers, KV heads, head dim
          "smollm2": (30, 3, 64, torch.bfloat16, 120_000),       # the CPU server's model
          "llama8b": (32, 8, 128, torch.bfloat16, 160_000)}      # ~the GPU server's pool


class FINISH_LENGTH:           # noqa: N801 (SGLang's finish-reason names): a final finish
    pass


class Server:
    """The parts of a scheduler the runtime talks to: pools, a request slot, a served call."""

    def __init__(self, config: KVCommConfig, shape: str = "tiny", device: str = "cpu"):
        layers, self.heads, self.head_dim, self.dtype, tokens = SHAPES[shape]
        self.device = device
        self.pool = MHATokenToKVPool(size=tokens, page_size=1, dtype=self.dtype,
                                     head_num=self.heads, head_dim=self.head_dim,
                                     layer_num=layers, device=device, enable_memory_saver=False,
                                     enable_alt_stream=False)
        self.allocator = TokenToKVPoolAllocator(size=tokens, dtype=self.dtype, device=device,
                                                kvcache=self.pool, need_sort=False)
        self.req_to_token = torch.zeros((1, 8192), dtype=torch.int32, device=device)
        self.runtime = KVCommRuntime(config, RopeSpec.build(self.head_dim, 500000.0), self.pool,
                                     self.allocator, tokens, self.req_to_token)
        # on a GPU: the server's KVCOMM_PROFILE=1 timing (synchronize around plan, materialize)
        self.runtime.profile = device != "cpu"
        self.count = 0
        self.flatten_ms: list[float] = []
        self.profiler, self.profiling = cProfile.Profile(), False
        self.counting, self.decide_calls, self.flatten_calls = False, None, None

    def serve(self, ids, new_tokens: int, hints: dict, namespace: str):
        """One request: decide, materialize the reused tail (as init_load_back), 'compute' the
        rest (random KV), finish (captures). Returns (decision, decide_ms, output ids)."""
        self.count += 1
        self.flatten_calls = None
        out = [7 + (self.count * 31 + i) % 9000 for i in range(new_tokens)]
        req = types.SimpleNamespace(
            rid=f"r{self.count}", origin_input_ids=list(ids), extra_key=namespace,
            sampling_params=types.SimpleNamespace(custom_params=hints), req_pool_idx=0,
            output_ids=out, finished_reason=FINISH_LENGTH(), return_logprob=False)
        total = len(ids) + new_tokens
        slots = self.allocator.alloc(total)
        for buf in self.pool.k_buffer + self.pool.v_buffer:
            buf[slots] = torch.randn(total, self.heads, self.head_dim, device=self.device,
                                     dtype=self.dtype)
        self.req_to_token[0, :total] = slots.to(torch.int32)
        if self.device != "cpu":
            torch.cuda.synchronize()           # decide's time must not include that fill
        if self.profiling:
            self.profiler.enable()
        start = time.perf_counter()
        if self.counting:
            with TorchCalls() as calls:
                decision = self.runtime.decide(req)
            self.decide_calls = calls
        else:
            decision = self.runtime.decide(req)
        decide_ms = (time.perf_counter() - start) * 1e3
        if decision is not None and decision.kind == "reuse":
            d = decision.plan.layout.prefix_length          # x0: a radix hit on a server
            n = len(ids) - decision.recompute - d
            self.runtime.materialize(req, decision, d, slots[d:d + n])
            decision.reused = n
        self.profiler.disable()
        start = time.perf_counter()
        self.runtime.on_finish(req, total)
        self.capture_ms = (time.perf_counter() - start) * 1e3
        self.allocator.free(slots)
        return decision, decide_ms, out


def timed_flatten(server: Server):
    """Wrap the runtime's from_reuse_plan to record its wall time."""
    inner = plan_module.from_reuse_plan

    def wrapped(*args, **kwargs):
        if server.counting:
            with TorchCalls() as calls:
                plan = inner(*args, **kwargs)
            server.flatten_calls = calls
            return plan
        server.last_flatten = (args, kwargs)
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            server.flatten_ms.append((time.perf_counter() - start) * 1e3)

    runtime_module.from_reuse_plan = wrapped


def compare_flatten(server: Server, other: str, reps: int = 400) -> None:
    """``from_reuse_plan`` of this tree vs the one in ``other`` (a plan.py, e.g. from the
    previous commit) on the last workflow's last plan, interleaved call by call in this
    process: a host change measured against its predecessor in the same run."""
    module = load_module(other, "other_plan")
    args, kwargs = server.last_flatten
    sync = torch.cuda.synchronize if args[1].is_cuda else (lambda: None)
    times = {"this": [], "other": []}
    for _ in range(reps):
        for name, fn in (("other", module.from_reuse_plan), ("this", plan_module.from_reuse_plan)):
            sync()
            start = time.perf_counter()
            fn(*args, **kwargs)
            times[name].append((time.perf_counter() - start) * 1e3)
    this, base = (statistics.median(times[k]) for k in ("this", "other"))
    print(f"from_reuse_plan, {args[1].shape[0]} rows, median of {reps} interleaved calls (host "
          f"time): this tree {this:.3f} ms, {other} {base:.3f} ms ({this / base:.2f}x)")


def run(args) -> tuple[list[dict], dict]:
    """Print the table and the profile; return the timed rows and, per agent, the torch calls
    (``TorchCalls``) of decide and of the flatten in the counted workflow (None: no flatten)."""
    config = KVCommConfig(gamma=1.0)          # as the GPU timing run: the gate is off
    server = Server(config, args.shape, args.device)
    timed_flatten(server)
    work = Workload(args.agents, args.prefix_tokens, (1000, 128000), seed=0)
    namespace = "kvcomm:host-path-benchmark-0001"   # 22+ chars: a valid namespace
    for agent, pieces, names in work.agents:
        standins = {name: ("standin", work.ids(16)) for name in names}
        ids, layout = work.prompt(pieces, names, standins)
        layout = [protocol.Piece(p.kind, p.length, p.placeholder,
                                 None if p.kind == "template" else "standin") for p in layout]
        server.serve(ids, 1, protocol.encode(agent=agent, layout=layout, template=True),
                     namespace)
    rows, calls = [], {}
    for r in range(args.warmup + args.workflows + 1):     # the last one counts torch calls
        qid, question, lead = f"w{r}", work.ids(args.input_tokens), work.ids(8)
        server.serve(lead + question, 1, protocol.encode(base=(f"{qid}.q", "user_question",
                                                               len(lead))), namespace)
        contents = {"user_question": (f"{qid}.q", question)}
        for agent, pieces, names in work.agents:
            ids, layout = work.prompt(pieces, names, contents)
            name = f"agent_{agent}_current"
            hints = protocol.encode(agent=agent, layout=layout, capture=(f"{qid}.a{agent}", name))
            counted = r == args.warmup + args.workflows
            timed = args.warmup <= r < args.warmup + args.workflows
            server.flatten_ms.clear()
            server.profiling, server.counting = timed, counted
            decision, decide_ms, out = server.serve(ids, args.output_tokens, hints, namespace)
            if counted:
                calls[int(agent) + 1] = (server.decide_calls, server.flatten_calls)
            if timed:
                rows.append({"agent": int(agent) + 1, "tokens": len(ids), "kind": decision.kind,
                             "decide_ms": decide_ms, "plan_ms": decision.plan_ms,
                             "materialize_ms": decision.materialize_ms,
                             "capture_ms": server.capture_ms,
                             "flatten_ms": sum(server.flatten_ms) if server.flatten_ms else None})
            contents[name] = (f"{qid}.a{agent}", out[:-1])
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU")
    print(f"host path per agent (ms, medians of {args.workflows} workflows; {device}, "
          f"{args.shape} KV)")
    print(f"{'agent':>5} {'tokens':>7} {'reused':>7} {'decide':>8} {'flatten':>8} "
          f"{'plan':>8} {'mat.':>8} {'capture':>8} {'torch calls: decide':>20} {'flatten':>8}")
    for agent in range(1, args.agents + 1):
        mine = [x for x in rows if x["agent"] == agent]
        reused = [x for x in mine if x["kind"] == "reuse"]
        med = lambda key: statistics.median([x[key] for x in reused if x[key] is not None]  # noqa: E731
                                            or [float("nan")])
        print(f"{agent:>5} {mine[0]['tokens']:>7} {len(reused):>3}/{len(mine):<3} "
              f"{med('decide_ms'):>8.3f} {med('flatten_ms'):>8.3f} "
              f"{med('plan_ms'):>8.3f} {med('materialize_ms'):>8.3f} {med('capture_ms'):>8.3f} "
              f"{_count(calls.get(agent, (None,))[0]):>20} "
              f"{_count(calls.get(agent, (None, None))[1]):>8}")
    anchors = {ph: len(p) for ns in server.runtime.namespaces.values()
               for ph, p in ns.state.anchors.pools.items()}
    print(f"anchors per placeholder: {anchors}")
    if args.compare_flatten:
        compare_flatten(server, args.compare_flatten)
    print("cProfile of decide + materialize" + (" (the CPU backend's torch reference stands in "
                                                "for the kernel)" if args.device == "cpu" else ""))
    stats = pstats.Stats(server.profiler)
    stats.sort_stats(args.sort).print_stats(args.top)
    return rows, calls


def _count(calls) -> str:
    return "-" if calls is None else str(len(calls.names))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workflows", type=int, default=5)
    parser.add_argument("--output-tokens", type=int, default=512)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernels)")
    parser.add_argument("--compare-flatten", metavar="PLAN_PY", default=None,
                        help="also time from_reuse_plan against another plan.py (e.g. the "
                             "previous commit's) on the same plan, interleaved")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="KV shape: tiny (2x2x8 fp32), smollm2 (30x3x64 bf16: the CPU "
                             "server's) or llama8b (32x8x128 bf16)")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumtime)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
