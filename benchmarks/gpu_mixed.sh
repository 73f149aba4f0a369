#!/usr/bin/env bash
# Issue 4's GPU tests and speed table in one device run (docs/mixed-precision.md):
#   OUT=/tmp/out bash benchmarks/gpu_mixed.sh [tests|bench|all]   (bench needs .data/traces/deepseek-v2-lite.prefill.a.npz)
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/expertyard-gpu}
WHAT=${1:-all}
mkdir -p "$OUT"
cli() { python3 -m expertyard.entrypoints.cli "$@"; }
LOG="$OUT/mixed.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"
if [[ $WHAT == tests || $WHAT == all ]]; then
  python3 -m pytest tests/gpu/test_mixed_precision_cuda.py tests/gpu/test_offload_cuda.py tests/gpu/test_engine_cuda.py \
    -q -p no:cacheprovider -rf 2>&1 | tail -15 | tee -a "$LOG"
fi
[[ $WHAT == bench || $WHAT == all ]] || exit 0
TRACE=.data/traces/deepseek-v2-lite.prefill.a.npz
HOBBIT=${HOBBIT_POLICY:-hobbit}
run() {  # name, then bench flags
  local name=$1; shift
  cli bench "$@" --offload --expert-cache-fraction 0.25 --batch-sizes 1 --prompt-len 32 --out "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$OUT/$name.log"; }
}
MX=(--synthetic mixtral-8x7b --num-layers 8 --decode-tokens 32)
DS=(--synthetic deepseek-v2-lite --routing-trace "$TRACE" --decode-tokens 64)
run mx_full_lru_nextgate "${MX[@]}" --policy lru --predictor next-gate
run mx_mixed_hobbit_nextgate "${MX[@]}" --policy "$HOBBIT" --predictor next-gate --low-precision int4
run mx_mixed_lru_nextgate "${MX[@]}" --policy lru --predictor next-gate --low-precision int4
run mx_mixed_hobbit_none "${MX[@]}" --policy "$HOBBIT" --predictor none --low-precision int4
run ds_full_lru_nextgate "${DS[@]}" --policy lru --predictor next-gate
run ds_mixed_hobbit_nextgate "${DS[@]}" --policy "$HOBBIT" --predictor next-gate --low-precision int4
run ds_mixed_hobbit_oracle "${DS[@]}" --policy "$HOBBIT" --predictor oracle --prefetch-depth 2 --low-precision int4
python3 - "$OUT" <<'PY' | tee -a "$LOG"
import glob, json, os, sys
print("| run | tok/s | x full lru next-gate | MB copied / token | full hit rate | pairs full / low / skipped | peak MiB |")
rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*_*_*.json"))):
    rows[os.path.basename(path)[:-5]] = json.load(open(path))["runs"][0]
for name, row in rows.items():
    base = rows.get(name[:2] + "_full_lru_nextgate")
    off, tps = row["offload"], row["expertyard"]["decode_tokens_per_s"]
    ratio = tps / base["expertyard"]["decode_tokens_per_s"] if base else float("nan")
    fr = "/".join(f"{off.get(f'pairs_{k}_fraction', float('nan')):.2f}" for k in ("full", "low", "skipped"))
    print(f"| {name} | {tps:.1f} | {ratio:.2f} | {off['bytes_per_token'] / 1e6:.1f} | {off['hit_rate']:.2f} | {fr} "
          f"| {row.get('peak_memory_bytes', 0) / 2**20:,.0f} |")
PY
