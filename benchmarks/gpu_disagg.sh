#!/usr/bin/env bash
# Disaggregated expert parallelism (issue 6) in one device run, on 4 GPUs (docs/disaggregation.md):
#   OUT=/tmp/out bash benchmarks/gpu_disagg.sh               (4 GPUs, NCCL, bf16; about 8 minutes)
#   DEVICE=cpu OUT=/tmp/out bash benchmarks/gpu_disagg.sh    (the same steps at tiny sizes on CPU with gloo)
#   STEPS=c OUT=/tmp/out bash benchmarks/gpu_disagg.sh       (only some of the steps below: any of a..f)
# (a) the NCCL correctness matrix, (b) M2N dispatch/combine vs all_to_all_single, (c) decode per GPU:
# ping-pong m=1..4 (2+2 and 3+1 ranks) vs colocated EP (m=1,2) on the same 4 GPUs, all with decode graphs on CUDA,
# and 2+2 m=1 with --eager-decode for reference; (d) the same comparison at a large batch of a model with few,
# big experts (Mixtral-8x7B shapes, batch 2048): enough tokens per expert that expert time grows with the
# micro-batch, the regime ping-pong is built for; (e) as (d) with 1,024-token prompts, so that an attention
# rank's cache reads take about as long as an expert rank's GEMMs (T_a ~ T_e, what `plan` balances for).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
OUT=${OUT:-/tmp/expertyard-gpu}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-abc}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
  TESTS=(tests/gpu/test_disagg_nccl.py)
  MODEL=(--synthetic qwen3-30b-a3b --num-layers 8 --dtype bfloat16)
  SHAPE=(--batch-sizes 256 --prompt-len 32 --decode-tokens 64)
  SIZES=4KB,16KB,64KB,256KB,1MB,4MB,8MB
  BIG=(--synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --prompt-len 256 --decode-tokens 32
       --async-scheduling both)
  LONG=(--synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --prompt-len 1024 --decode-tokens 32
        --async-scheduling both)
  NULL=(--synthetic mixtral-8x7b --num-layers 2 --dtype bfloat16 --batch-sizes 1024 --prompt-len 32 --decode-tokens 48)
  WINDOW=70:72  # engine steps: 2 prefill + 47 decode (warm-up pass), then 2 + 47 timed
else
  TESTS=(tests/test_disagg_cpu.py -k "tiny-disaggregated-2x2 or tiny-colocated-2x2")
  MODEL=()   # the bundled model
  SHAPE=(--batch-sizes 8 --prompt-len 8 --decode-tokens 8)
  SIZES=4KB,64KB
  BIG=(--batch-sizes 16 --prompt-len 8 --decode-tokens 4 --async-scheduling both)
  LONG=(--batch-sizes 16 --prompt-len 32 --decode-tokens 4 --async-scheduling both)
  NULL=(--batch-sizes 8 --prompt-len 8 --decode-tokens 8)
  WINDOW=10:12
fi

if [[ $STEPS == *a* ]]; then
echo "== (a) correctness: distributed vs single-device resident" | tee -a "$LOG"
timeout 300 python3 -m pytest "${TESTS[@]}" -q -p no:cacheprovider 2>&1 | tail -6 | tee -a "$LOG"
fi

if [[ $STEPS == *b* ]]; then
echo "== (b) M2N micro-benchmark (2 attention x 2 expert ranks)" | tee -a "$LOG"
timeout 120 python3 benchmarks/bench_m2n.py --attention-ranks 2 --expert-ranks 2 --device "$DEVICE" --sizes "$SIZES" \
  --out "$OUT/m2n.json" 2>&1 | quiet | tee -a "$LOG"
fi
bench() {  # name, then flags
  local name=$1; shift
  timeout 300 python3 -m expertyard.entrypoints.cli bench --disaggregate --device "$DEVICE" --dist-timeout 120 "$@" \
    --out "$OUT/$name.json" 2>&1 | quiet | tee -a "$LOG"
}
table() {  # prefix of the runs' names
python3 - "$OUT" "$1" <<'PY' | tee -a "$LOG"
import json, sys
from pathlib import Path
out, p = Path(sys.argv[1]), sys.argv[2]
runs = {}
for name in ("pingpong_2x2", "pingpong_3x1", "pingpong_1x3", "colocated_4", "eager_2x2"):
    f = out / f"{p}{name}.json"
    if f.exists():
        runs[name] = json.loads(f.read_text())
if "colocated_4" not in runs:
    sys.exit("no colocated result: see log.txt")
best = max(runs["colocated_4"]["runs"], key=lambda r: r["per_gpu_tokens_per_s"])  # colocated at its best m
co = best["per_gpu_tokens_per_s"]
print(f"\nper-GPU decode throughput ({runs['colocated_4']['model']}, batch {best['batch']}, "
      f"{runs['colocated_4']['dtype']} on {runs['colocated_4']['gpus']} ranks; x colocated = over colocated's best "
      "m and scheduling; x m=1 = over m=1 with the same scheduling)")
print(f"{'deployment':>14} {'m':>2} {'async':>5} {'tok/s/GPU':>10} {'TPOT ms':>8} {'x colocated':>12} {'x m=1':>6}")
for name, label in (("colocated_4", "colocated"), ("eager_2x2", "2x2 eager"), ("pingpong_2x2", "2x2"),
                    ("pingpong_3x1", "3x1"), ("pingpong_1x3", "1x3")):
    if name not in runs:
        continue
    rows = runs[name]["runs"]
    for r in rows:
        a = r.get("async_scheduling", False)
        base = next((q for q in rows if q["micro_batches"] == 1 and q.get("async_scheduling", False) == a), None)
        rel = f"{r['per_gpu_tokens_per_s'] / base['per_gpu_tokens_per_s']:6.2f}" if base and name != "colocated_4" else ""
        print(f"{label:>14} {r['micro_batches']:>2} {'on' if a else 'off':>5} {r['per_gpu_tokens_per_s']:10.1f} "
              f"{r['tpot_ms']:8.2f} {r['per_gpu_tokens_per_s'] / co:12.2f} {rel:>6}")
print("target: ping-pong >= 1.3x colocated and >= 1.5x m=1")
PY
}

if [[ $STEPS == *c* ]]; then
echo "== (c) decode on 4 ranks" | tee -a "$LOG"
S=("${MODEL[@]}" "${SHAPE[@]}")
bench pingpong_2x2 "${S[@]}" --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2,3,4
bench pingpong_3x1 "${S[@]}" --mode disaggregated --attention-ranks 3 --expert-ranks 1 --micro-batches 1,2,3,4
bench colocated_4 "${S[@]}" --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2
bench eager_2x2 "${S[@]}" --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 1 --eager-decode
table ""
fi

large_batch() {  # prefix of the runs' names, then the shape's flags: 2+2 and 1+3 ping-pong, colocated 4
  local p=$1; shift
  bench "${p}pingpong_2x2" "$@" --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2
  bench "${p}pingpong_1x3" "$@" --mode disaggregated --attention-ranks 1 --expert-ranks 3 --micro-batches 1,2
  bench "${p}colocated_4" "$@" --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1
  table "$p"
}

if [[ $STEPS == *d* ]]; then
echo "== (d) decode on 4 ranks, large batch, few big experts" | tee -a "$LOG"
large_batch big_ "${BIG[@]}"
fi

if [[ $STEPS == *e* ]]; then
echo "== (e) decode on 4 ranks, large batch, longer context (attention time ~ expert time)" | tee -a "$LOG"
large_batch long_ "${LONG[@]}"
fi

if [[ $STEPS == *f* ]]; then
echo "== (f) where the exchange term goes: profiled 1 + 1, batch 1,024" | tee -a "$LOG"
EXPERTYARD_PROFILE_STEPS=$WINDOW EXPERTYARD_PROFILE_DIR="$OUT" \
  bench profiled_1x1 "${NULL[@]}" --mode disaggregated --attention-ranks 1 --expert-ranks 1 --micro-batches 1
fi
