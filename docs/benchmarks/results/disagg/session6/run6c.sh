#!/bin/bash
# session 6, run 3: NCCL matrix (async scheduling off and on), the CUDA engine's async test, 1+1 null deployment A/B
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u | tee $OUT/summary.txt
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
timeout 330 python3 -m pytest tests/gpu/test_disagg_nccl.py -q -p no:cacheprovider > $OUT/nccl.txt 2>&1
tail -3 $OUT/nccl.txt | tee -a $OUT/summary.txt
( CUDA_VISIBLE_DEVICES=3 timeout 150 python3 -m pytest tests/gpu/test_engine_cuda.py -q -p no:cacheprovider -k async > $OUT/engine_async.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=0,1 EXPERTYARD_STEP_TIMES=1 timeout 200 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dtype bfloat16 --synthetic mixtral-8x7b --dist-timeout 120 --mode disaggregated --attention-ranks 1 --expert-ranks 1 --num-layers 2 --batch-sizes 1024 --prompt-len 32 --decode-tokens 48 --micro-batches 1 --async-scheduling both --out $OUT/null_1024.json 2>&1 | quiet > $OUT/null_1024.txt ) &
wait
tail -3 $OUT/engine_async.txt | tee -a $OUT/summary.txt
cat $OUT/null_1024.txt
date -u | tee -a $OUT/summary.txt
