#!/usr/bin/env bash
# Issue 6, deployment planning: calibrate the plan profile on this GPU (attention step, fused_moe, and, when two
# GPUs are visible, NCCL send/recv and the null deployments of T_step and T_x), plan with it, and run the plan's
# GPU tests. Under 2 minutes on one H200, about a minute more with two GPUs:
#   OUT=/tmp/out bash benchmarks/gpu_plan_calibrate.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/expertyard-plan}
mkdir -p "$OUT"
cli() { python3 -m expertyard.entrypoints.cli "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/device.txt"
P="$OUT/profile_mixtral-8x7b.json"
time cli plan calibrate --synthetic mixtral-8x7b --device cuda --out "$P" 2>&1 | tee "$OUT/calibrate.txt"
# the deployments of docs/plan.md "Predicted vs measured" (bench defaults: prompt 128, 64 decoded -> context 160)
for ranks in 1 2; do
  cli plan predict --synthetic mixtral-8x7b --num-layers 8 --attention-ranks $ranks --expert-ranks $ranks \
      --micro-batches 3 --batch 96 --context-len 160 --profile "$P" --json | tee "$OUT/predict_$((2 * ranks))gpu.json"
done
cli plan --synthetic mixtral-8x22b --gpus 64 --profile "$P" --top 5 2>&1 | tee "$OUT/plan_mixtral-8x22b_64.txt"
python3 -m pytest tests/gpu/test_plan_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
