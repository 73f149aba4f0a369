#!/usr/bin/env bash
# The foundation issue's GPU checks and benchmarks, in one device run (see docs/benchmarks/foundation.md):
#   OUT=/tmp/out bash benchmarks/gpu_foundation.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/expertyard-gpu}
mkdir -p "$OUT"
cli() { python3 -m expertyard.entrypoints.cli "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"; } | tee "$OUT/device.txt"
python3 -m pytest tests/gpu/test_engine_cuda.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
python3 benchmarks/parity_table.py --device cuda --dtype float32 2>/dev/null | tee "$OUT/parity_cuda_fp32.md"
cli generate --prompt "Once upon a time" --max-tokens 64 --temperature 0 --json | tee "$OUT/generate.json"
cli bench --synthetic mixtral-8x7b --num-layers 8 --batch-sizes 1,32 --compare transformers --out "$OUT/bench_mixtral8.json"
cli bench --synthetic olmoe-1b-7b --batch-sizes 1,32 --compare transformers --out "$OUT/bench_olmoe.json"
