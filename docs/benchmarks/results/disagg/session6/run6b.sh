#!/bin/bash
# session 6, run 2: host phases of a decode step (EXPERTYARD_STEP_TIMES) in 1+1 deployments
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING EXPERTYARD_STEP_TIMES=1
date -u
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
B=(python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dtype bfloat16 --synthetic mixtral-8x7b --dist-timeout 120 --mode disaggregated --attention-ranks 1 --expert-ranks 1)
( CUDA_VISIBLE_DEVICES=0,1 timeout 200 "${B[@]}" --num-layers 2 --batch-sizes 1024 --prompt-len 32 --decode-tokens 48 --micro-batches 1 --out $OUT/null_1024.json 2>&1 | quiet > $OUT/null_1024.txt ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout 250 "${B[@]}" --num-layers 8 --batch-sizes 2048 --prompt-len 256 --decode-tokens 32 --micro-batches 1,2 --out $OUT/big_1x1.json 2>&1 | quiet > $OUT/big_1x1.txt ) &
wait
cat $OUT/null_1024.txt $OUT/big_1x1.txt
date -u
