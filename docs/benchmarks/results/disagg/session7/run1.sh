set -x
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
python -c "import torch, torch.nn.functional as F; print(torch.__version__, hasattr(F,'grouped_mm'))"
export PYTHONPATH=src
python benchmarks/bench_moe_paths.py --out $OUT/moe_paths.json 2>&1 | tee $OUT/moe_paths.txt
python -m pytest -q -x tests/gpu/test_fused_moe_gpu.py 2>&1 | tail -15 | tee $OUT/test_fused_moe_gpu.txt
python -m pytest -q tests/gpu/test_engine_cuda.py 2>&1 | tail -8 | tee $OUT/test_engine_cuda.txt
