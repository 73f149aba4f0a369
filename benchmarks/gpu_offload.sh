#!/usr/bin/env bash
# The offloading issue's GPU tests and benchmarks in one device run (docs/benchmarks/offload.md):
#   OUT=/tmp/out bash benchmarks/gpu_offload.sh   (needs .data/traces/deepseek-v2-lite.prefill.a.npz)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/expertyard-gpu}
mkdir -p "$OUT"
cli() { python3 -m expertyard.entrypoints.cli "$@"; }
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOG"
python3 -m pytest tests/gpu/test_offload_cuda.py tests/gpu/test_engine_cuda.py -q -p no:cacheprovider 2>&1 | tail -8 | tee -a "$LOG"
TRACE=.data/traces/deepseek-v2-lite.prefill.a.npz
run() {  # name, then bench flags
  local name=$1; shift
  cli bench "$@" --offload --expert-cache-fraction 0.25 --batch-sizes 1 --prompt-len 32 --out "$OUT/$name.json" 2>&1 \
    | grep -v "it/s" | tee -a "$LOG"
}
DS=(--synthetic deepseek-v2-lite --routing-trace "$TRACE" --decode-tokens 64)
MX=(--synthetic mixtral-8x7b --num-layers 8 --decode-tokens 32)
run ds_lru_none "${DS[@]}" --policy lru --predictor none
run ds_ld_none "${DS[@]}" --policy layer-distance --predictor none
run ds_ld_oracle "${DS[@]}" --policy layer-distance --predictor oracle
run mx_lru_none "${MX[@]}" --policy lru --predictor none
run mx_ld_none "${MX[@]}" --policy layer-distance --predictor none
run mx_ld_nextgate "${MX[@]}" --policy layer-distance --predictor next-gate --compare accelerate
