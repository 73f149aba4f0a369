#!/bin/bash
# session 5, run 3: plan calibrate (step term) + NCCL matrix + Mixtral batch-96 benches for predicted vs measured
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
B=(python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dtype bfloat16 --synthetic mixtral-8x7b
   --num-layers 8 --batch-sizes 96 --prompt-len 128 --decode-tokens 64 --mode disaggregated --dist-timeout 120)
( CUDA_VISIBLE_DEVICES=0,1 timeout 330 python3 -m pytest tests/gpu/test_plan_gpu.py -q -p no:cacheprovider \
    --basetemp=/tmp/pt > $OUT/plan_gpu_tests.txt 2>&1; cp /tmp/pt/plan0/profile.json $OUT/profile_mixtral-8x7b.json ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout 200 python3 -m pytest tests/gpu/test_disagg_nccl.py -q -p no:cacheprovider \
    -k "1x1" > $OUT/nccl_1x1.txt 2>&1 ) &
wait
tail -3 $OUT/plan_gpu_tests.txt $OUT/nccl_1x1.txt
CUDA_VISIBLE_DEVICES=0,1 timeout 120 "${B[@]}" --attention-ranks 1 --expert-ranks 1 --micro-batches 1,2,3 --out $OUT/mixtral_1x1.json 2>&1 | quiet > $OUT/benches.txt
timeout 120 "${B[@]}" --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2,3 --out $OUT/mixtral_2x2.json 2>&1 | quiet >> $OUT/benches.txt
cat $OUT/benches.txt
timeout 200 python3 -m pytest tests/gpu/test_disagg_nccl.py -q -p no:cacheprovider -k "not 1x1" > $OUT/nccl_rest.txt 2>&1
tail -3 $OUT/nccl_rest.txt
date -u
