#!/bin/bash
# session 6, run 6: best m with async scheduling at prompt 1,024 (batch 2,048): colocated m=1 vs 2+2 m=2,3, one lease
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
B=(python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --decode-tokens 32 --prompt-len 1024 --async-scheduling on)
timeout 100 "${B[@]}" --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1 --out $OUT/long_colocated_4_async.json 2>&1 | quiet > $OUT/log.txt
timeout 140 "${B[@]}" --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 2,3 --out $OUT/long_pingpong_2x2_async.json 2>&1 | quiet >> $OUT/log.txt
cat $OUT/log.txt
date -u
