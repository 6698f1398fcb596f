#!/usr/bin/env bash
# Device side of the soak (issue 13): start a kvcomm server with dummy Llama-3.1-8B weights on the
# one GPU, with the invariant checker, SGLang's strict idle memory check, metrics, a small KV
# pool and chunked prefill, then run benchmarks/soak.py against it (32 workflows by default) and
# copy the JSON and the server log to $OUT.
#
#   bash benchmarks/gpu/soak_server.sh [soak.py args ...]        # e.g. --duration 60
#
# Environment: POOL (--max-total-tokens, default 40000), CHUNK (--chunked-prefill-size, 512),
# KVCOMM_CONFIG (default {"gamma": 1.0}, as benchmarks/soak.py's own server).
# Needs the stage in /tmp/site (shared/tools/gpu: device_receive.sh); run from the repo root.
set -euo pipefail
STAGE=/tmp/kvcomm-stage
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

d=/tmp/site/kvcomm_sglang-0.0.0.dist-info         # the plugin's entry point (code from $PWD)
mkdir -p $d && touch $d/RECORD
printf 'Metadata-Version: 2.1\nName: kvcomm-sglang\nVersion: 0.0.0\n' > $d/METADATA
printf '[sglang.srt.plugins]\nkvcomm = kvcomm_sglang.runtime_patch.plugin:register\n' > $d/entry_points.txt

bash $STAGE/launch_dummy.sh --stop soak >/dev/null 2>&1 || true
trap 'cp /tmp/sglang_soak.log "$OUT/sglang_soak.log" 2>/dev/null || true' EXIT
KVCOMM_CODE=$PWD SGLANG_PLUGINS=kvcomm KVCOMM_DEBUG_INVARIANTS=1 WAIT_S=420 PORT=30000 \
  KVCOMM_CONFIG=${KVCOMM_CONFIG:-'{"gamma": 1.0}'} \
  SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1 \
  bash $STAGE/launch_dummy.sh soak --radix-cache-backend kvcomm --page-size 1 \
  --mem-fraction-static 0.85 --enable-metrics --max-total-tokens "${POOL:-40000}" \
  --chunked-prefill-size "${CHUNK:-512}" --schedule-conservativeness 0.05
PYTHONPATH=$PWD:/tmp/site python3 benchmarks/soak.py --url http://127.0.0.1:30000 \
  --server-log /tmp/sglang_soak.log --device cuda --json "$OUT/soak-gpu.json" "$@"
