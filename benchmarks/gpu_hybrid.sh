#!/usr/bin/env bash
# Hybrid CPU-GPU offloading on one GPU host: the CUDA tests, then decode side by side in one process per model:
# copy-only, CPU-only (every miss on the CPU), hybrid, hybrid with int4 CPU copies, and int4 on both pipes.
# Usage (repo root; TRACE = a copy of the shared DeepSeek-V2-Lite routing trace):
#   OUT=/tmp/out TRACE=.devdata/deepseek-v2-lite.prefill.a.npz STEP=tests|deepseek|mixtral8|mixtral bash benchmarks/gpu_hybrid.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bench() { python -m expertyard.entrypoints.cli bench --offload --hybrid-sweep --prompt-len 32 "$@"; }
case "${STEP:-tests}" in
  tests)
    timeout 420 python -m pytest -q tests/gpu --ignore=tests/gpu/test_disagg_nccl.py -p no:cacheprovider -x \
      2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
  deepseek)  # real routing forced from the trace, 25% of the experts cached
    bench --synthetic deepseek-v2-lite --routing-trace "$TRACE" --expert-cache-fraction 0.25 --batch-sizes 1 \
      --decode-tokens 64 --out "$OUT/deepseek.json" ;;
  mixtral8)  # 8 layers, sampled decode, 24% of the experts cached (the full model's share under 24 GiB)
    bench --synthetic mixtral-8x7b --num-layers 8 --expert-cache-fraction 0.24 --temperature 1 --batch-sizes 1,8 \
      --decode-tokens 32 --out "$OUT/mixtral8.json" ;;
  mixtral)  # all 32 layers under a 24 GiB budget, sampled decode
    bench --synthetic mixtral-8x7b --gpu-memory-budget 24GiB --temperature 1 --batch-sizes 1 --decode-tokens 64 \
      --out "$OUT/mixtral.json" ;;
esac
