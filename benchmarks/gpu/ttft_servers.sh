#!/usr/bin/env bash
# Device side of the GPU TTFT benchmark (docs/gpu.md): start a vanilla SGLang server (port 30001)
# and then a kvcomm one (port 30000) with dummy Llama-3.1-8B weights on the one GPU, run
# benchmarks/ttft_gpu.py against both (whole workflows on the client's clock, no sleeps), copy
# the JSON and the logs to $OUT. One device call (the stage received before):
#
#   GRAPH_FIX=1 LABEL=main bash benchmarks/gpu/ttft_servers.sh --warmup 3 --repeats 8 [--concurrent 32]
#
# Environment:
#   LABEL           names the output files (ttft-gpu-LABEL.json, sglang_*-LABEL.log)
#   BUDGET_S=540    seconds the whole call may take: ttft_gpu.py gets what is left after the
#                   servers started as --budget-s (it starts no round, nor the load mode, that
#                   would end after it; the JSON keeps every timed round); later args win
#   GRAPH_FIX=1     capture prefill CUDA graphs for 1 and 2 tokens too (SGLang's own
#                   --cuda-graph-bs-prefill): the one-token tail after a cached or reused
#                   prefix then replays a graph instead of running eagerly
#   KVCOMM_CONFIG   the kvcomm server's KVCommConfig JSON (default {"gamma": 1.0}: the paper's
#                   timing run disabled the entropy gate)
#   SERVER_FLAGS    more flags for both servers (e.g. "--gc-warning-threshold-secs 0.004")
#   KEEP_DENSE=1    keep a healthy dense server from an earlier call (same flags)
#   PROFILE=1       one more (untimed) workflow whose last agent's KVCOMM call and dense radix
#                   hit run under SGLang's torch profiler; trace summaries go to $OUT
#   MEM_DENSE=0.45, MEM_KVCOMM=0.85
#                   --mem-fraction-static of each server. Two 8B servers share the card, started
#                   one after the other: SGLang 0.5.17 sizes the KV pool so that (1 - fraction)
#                   of the card's total memory stays free, so the second needs the larger one
# Needs the stage in /tmp/site (shared/tools/gpu: device_receive.sh) and is run from the repo root.
set -euo pipefail
STAGE=/tmp/kvcomm-stage
OUT=${OUT:-/tmp/out}
LABEL=${LABEL:-run}
MEM_DENSE=${MEM_DENSE:-0.45}
MEM_KVCOMM=${MEM_KVCOMM:-0.85}
export KVCOMM_CONFIG=${KVCOMM_CONFIG:-'{"gamma": 1.0}'}
mkdir -p "$OUT"

# the plugin's entry point: a hand-written dist-info (the code itself comes from $PWD)
d=/tmp/site/kvcomm_sglang-0.0.0.dist-info
mkdir -p $d && touch $d/RECORD
printf 'Metadata-Version: 2.1\nName: kvcomm-sglang\nVersion: 0.0.0\n' > $d/METADATA
printf '[sglang.srt.plugins]\nkvcomm = kvcomm_sglang.runtime_patch.plugin:register\n' > $d/entry_points.txt

flags=(${SERVER_FLAGS:-})
if [ "${GRAPH_FIX:-0}" = 1 ]; then
  bs=$(python3 -c 'print(*([1, 2] + list(range(4, 33, 4)) + list(range(48, 257, 16)) + list(range(288, 513, 32)) + list(range(576, 1025, 64)) + list(range(1280, 4097, 256)) + list(range(4608, 8193, 512))))')
  flags+=(--cuda-graph-bs-prefill $bs)
fi

healthy() { curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/health" | grep -q 200; }

wait_for() {   # NAME PORT
  local t0=$SECONDS
  until healthy "$2"; do
    if ! kill -0 "$(cat /tmp/sglang_$1.pid)" 2>/dev/null; then
      echo "server $1 died:"; tail -n 40 /tmp/sglang_$1.log; return 1
    fi
    (( SECONDS - t0 < 420 )) || { echo "server $1 not healthy after 420 s"; tail -n 30 /tmp/sglang_$1.log; return 1; }
    sleep 2
  done
  echo "server $1 healthy after $(( SECONDS - t0 )) s"
}

if [ "${KEEP_DENSE:-0}" = 1 ] && healthy 30001; then
  echo "keeping the dense server"
else
  bash $STAGE/launch_dummy.sh --stop dense >/dev/null 2>&1 || true
  PORT=30001 bash $STAGE/launch_dummy.sh dense --mem-fraction-static "$MEM_DENSE" "${flags[@]}"
  wait_for dense 30001
fi
bash $STAGE/launch_dummy.sh --stop kvcomm >/dev/null 2>&1 || true
KVCOMM_CODE=$PWD SGLANG_PLUGINS=kvcomm KVCOMM_PROFILE=1 PORT=30000 \
  bash $STAGE/launch_dummy.sh kvcomm --radix-cache-backend kvcomm --page-size 1 \
  --mem-fraction-static "$MEM_KVCOMM" "${flags[@]}"
trap 'cp /tmp/sglang_kvcomm.log "$OUT/sglang_kvcomm-$LABEL.log"; cp /tmp/sglang_dense.log "$OUT/sglang_dense-$LABEL.log" 2>/dev/null || true' EXIT
wait_for kvcomm 30000
grep -h "KV Cache is allocated\|max_total_num_tokens=" /tmp/sglang_dense.log /tmp/sglang_kvcomm.log | cut -c1-200 || true
grep -h "Tree cache initialized\|kvcomm: radix-cache backend ready" /tmp/sglang_kvcomm.log | head -3 || true

prof=()
[ "${PROFILE:-0}" = 1 ] && prof=(--profile-dir "/tmp/kvcomm-prof-$LABEL")
PYTHONPATH=$PWD:/tmp/site python3 benchmarks/ttft_gpu.py "${prof[@]}" --kvcomm-url http://127.0.0.1:30000 \
  --dense-url http://127.0.0.1:30001 --label "$LABEL GRAPH_FIX=${GRAPH_FIX:-0} KVCOMM_CONFIG=$KVCOMM_CONFIG" \
  --budget-s $(( ${BUDGET_S:-540} - SECONDS )) --out "$OUT/ttft-gpu-$LABEL.json" "$@"
if [ "${PROFILE:-0}" = 1 ]; then
  python3 benchmarks/gpu/trace_summary.py $(find "/tmp/kvcomm-prof-$LABEL" -name '*.trace.json*') \
    --json "$OUT/trace-summary-$LABEL.json" > "$OUT/trace-summary-$LABEL.txt" || true
  head -c 6000 "$OUT/trace-summary-$LABEL.txt" || true
fi
for n in dense kvcomm; do
  echo "$n: prefill batches with cuda graph: $(grep -c 'cuda graph: True' /tmp/sglang_$n.log || true)," \
       "without: $(grep -c 'cuda graph: False' /tmp/sglang_$n.log || true)"
done
