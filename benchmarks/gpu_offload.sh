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
for pred in none next-gate oracle; do
  cli bench --synthetic deepseek-v2-lite --offload --expert-cache-fraction 0.25 --routing-trace "$TRACE" \
    --predictor "$pred" --batch-sizes 1 --prompt-len 32 --decode-tokens 64 --out "$OUT/ds_$pred.json" 2>&1 | grep -v "it/s" | tee -a "$LOG"
done
for pred in none next-gate; do
  extra=(); [ "$pred" = next-gate ] && extra=(--compare accelerate)
  cli bench --synthetic mixtral-8x7b --num-layers 8 --offload --expert-cache-fraction 0.25 --predictor "$pred" \
    --batch-sizes 1 --prompt-len 32 --decode-tokens 32 "${extra[@]}" --out "$OUT/mx_$pred.json" 2>&1 | grep -v "it/s" | tee -a "$LOG"
done
