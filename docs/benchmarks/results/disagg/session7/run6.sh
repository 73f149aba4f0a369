# session 7 run 6 (4 x H200): the same after freezing start-up objects (engine/collector.py)
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING EXPERTYARD_STEP_TIMES=1
date -u
for i in 1 2; do
  timeout 200 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 \
    --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --prompt-len 256 --decode-tokens 32 \
    --async-scheduling on --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1 \
    --out $OUT/coloc_rep$i.json > $OUT/coloc_rep$i.txt 2>&1
  grep -A3 "^batch" $OUT/coloc_rep$i.txt
done
grep -h -E "garbage" $OUT/coloc_rep*.txt
date -u
timeout 200 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 \
  --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --prompt-len 256 --decode-tokens 32 \
  --async-scheduling on --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 2 \
  --out $OUT/pingpong_2x2_m2.json > $OUT/pingpong_2x2_m2.txt 2>&1
grep -A3 "^batch" $OUT/pingpong_2x2_m2.txt; grep -h "garbage" $OUT/pingpong_2x2_m2.txt
