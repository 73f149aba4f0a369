#!/usr/bin/env bash
# The server issue's GPU benchmarks in one device run (docs/serving.md):
#   OUT=/tmp/out bash benchmarks/gpu_serving.sh [resident|offload|all]
# Needs fastapi/uvicorn/pydantic importable (the device has no registry: install wheels first, see docs/serving.md).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/expertyard-gpu}
WHAT=${1:-all}
mkdir -p "$OUT"
cli() { python3 -m expertyard.entrypoints.cli "$@"; }
get() { python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" "$1" 2>/dev/null; }
LOG="$OUT/serving.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"

serve_and_bench() {  # name, port, "server flags", "bench flags"
  local name=$1 port=$2 server=$3 bench=$4
  cli serve $server --port "$port" > "$OUT/$name.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    get "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $pid 2>/dev/null || { echo "$name: server died"; tail -20 "$OUT/$name.server.log"; return 1; }
    sleep 1
  done
  grep -i "warm" "$OUT/$name.server.log" | tail -2 | tee -a "$LOG"
  cli bench serving --url "http://127.0.0.1:$port" $bench --json > "$OUT/$name.json" 2> "$OUT/$name.bench.err"
  get "http://127.0.0.1:$port/metrics" > "$OUT/$name.metrics.txt"
  kill -TERM $pid; wait $pid
  python3 - "$OUT/$name.json" "$name" <<'PY' | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"## {sys.argv[2]}")
print("| concurrency | requests | errors | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | x one stream |")
base = None
for lv in r["levels"]:
    tput = lv["output_tokens_per_s"]
    base = base or tput
    print(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {tput:,.1f} | {lv['ttft_p50_ms']:.1f} / "
          f"{lv['ttft_p99_ms']:.1f} | {lv['tpot_p50_ms']:.2f} / {lv['tpot_p90_ms']:.2f} / {lv['tpot_p99_ms']:.2f} "
          f"| {tput / base:.2f} |")
PY
}

if [[ $WHAT == smoke ]]; then  # CPU check of this script: the bundled model
  serve_and_bench smoke 8100 "--max-num-seqs 4" "--concurrency 1,4 --num-requests 8 --input-len 8 --output-len 8"
fi
if [[ $WHAT == resident || $WHAT == all ]]; then
  serve_and_bench olmoe_resident 8101 "--synthetic olmoe-1b-7b --max-num-seqs 32 --max-model-len 1024" \
    "--concurrency 1,32 --input-len 128 --output-len 128"
fi
if [[ $WHAT == offload || $WHAT == all ]]; then
  serve_and_bench mixtral_offload 8102 \
    "--synthetic mixtral-8x7b --num-layers 8 --offload --expert-cache-fraction 0.25 --max-num-seqs 16 --max-model-len 512" \
    "--concurrency 1,2,4,8,16 --num-requests 16 --input-len 32 --output-len 32"
fi
