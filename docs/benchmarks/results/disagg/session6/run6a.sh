#!/bin/bash
# session 6, run 1: NCCL matrix on the current code, then (GPUs 0,1) the profiled 1+1 null deployment and
# (GPUs 2,3) tests/gpu/test_plan_gpu.py
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u | tee $OUT/summary.txt
timeout 280 python3 -m pytest tests/gpu/test_disagg_nccl.py -q -p no:cacheprovider > $OUT/nccl.txt 2>&1
tail -3 $OUT/nccl.txt | tee -a $OUT/summary.txt
( CUDA_VISIBLE_DEVICES=0,1 STEPS=f OUT=$OUT/f timeout 200 bash benchmarks/gpu_disagg.sh > /dev/null 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout 250 python3 -m pytest tests/gpu/test_plan_gpu.py -q -p no:cacheprovider \
    --basetemp=/tmp/pt > $OUT/plan_gpu_tests.txt 2>&1 ) &
wait
tail -3 $OUT/plan_gpu_tests.txt | tee -a $OUT/summary.txt
python3 benchmarks/trace_phases.py $OUT/f/rank*_steps*.json.gz --step-window 8000 > $OUT/phases.txt 2>&1
head -40 $OUT/phases.txt
date -u | tee -a $OUT/summary.txt
