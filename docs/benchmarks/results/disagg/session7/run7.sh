# session 7 run 7 (4 x H200): colocated at batch 2048 and 3072 (async on) with step intervals: steady or hiccups?
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING EXPERTYARD_STEP_TIMES=1
date -u
timeout 200 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 \
  --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048,3072 --prompt-len 256 --decode-tokens 32 \
  --async-scheduling on --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1 \
  --out $OUT/coloc_2048_3072.json > $OUT/coloc_2048_3072.txt 2>&1
grep -A4 "^batch" $OUT/coloc_2048_3072.txt; grep -h -B1 "garbage" $OUT/coloc_2048_3072.txt | head -12
date -u
