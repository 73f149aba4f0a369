# session 7 run 2 (4 x H200): new large-bucket fused-MoE blocks; decode at 8 and 32 layers (async on)
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_moe_paths.py --no-sweep --out $OUT/moe_paths_new.json \
  --cases mixtral-gpu-2048 mixtral-2x2-m2 mixtral-2x2-m1 mixtral-coloc-4 qwen3-gpu-2048 2>&1 | tee $OUT/moe_paths_new.txt
bench() {  # name, then flags
  local name=$1; shift
  timeout 400 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 180 "$@" \
    --out "$OUT/$name.json" 2>&1 | quiet | tail -12 | tee -a "$OUT/log.txt"
}
for L in 8 32; do
  S=(--synthetic mixtral-8x7b --num-layers $L --dtype bfloat16 --batch-sizes 2048 --prompt-len 256 --decode-tokens 32
     --async-scheduling on)
  bench L${L}_pingpong_2x2 "${S[@]}" --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2,3
  bench L${L}_colocated_4 "${S[@]}" --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1
done
python3 - $OUT <<'PY' | tee -a $OUT/log.txt
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'layers':>6} {'deployment':>10} {'m':>2} {'tok/s/GPU':>10} {'TPOT ms':>8} {'x coloc':>8} {'x m=1':>6}")
for L in (8, 32):
    co = json.loads((out / f"L{L}_colocated_4.json").read_text())["runs"][0]
    pp = json.loads((out / f"L{L}_pingpong_2x2.json").read_text())["runs"]
    m1 = next(r for r in pp if r["micro_batches"] == 1)
    for name, r in [("colocated", co)] + [("2x2", r) for r in pp]:
        x1 = r["per_gpu_tokens_per_s"] / m1["per_gpu_tokens_per_s"] if name == "2x2" else float("nan")
        print(f"{L:6d} {name:>10} {r['micro_batches']:2d} {r['per_gpu_tokens_per_s']:10.1f} {r['tpot_ms']:8.2f} "
              f"{r['per_gpu_tokens_per_s'] / co['per_gpu_tokens_per_s']:8.2f} {x1:6.2f}")
PY
CUDA_VISIBLE_DEVICES=0 python -m pytest -q tests/gpu/test_fused_moe_gpu.py 2>&1 | tail -3 | tee $OUT/test_fused_moe_gpu.txt
