export PYTHONPATH=src
date -u
python benchmarks/bench_moe_paths.py --sweep-from 5 --out $OUT/moe_sweep2.json \
  --cases mixtral-gpu-2048 mixtral-2x2-m2 mixtral-2x2-m1 mixtral-1x3-m2 mixtral-coloc-4 qwen3-2x2-b2048 2>&1 | tee $OUT/moe_sweep2.txt
python3 - $OUT/moe_sweep2.json <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    print(row["case"], round(row["triton_us"], 1))
    for s in sorted(row["sweep"], key=lambda s: s["us"]):
        c = s["config"]; print("   ", round(s["us"], 1), c["BLOCK_M"], tuple(c["gate_up"].values()), tuple(c["down"].values())[:4])
PY
