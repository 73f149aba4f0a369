# session 7 run 5 (4 x H200): is colocated + async bimodal? three identical processes, step intervals, phases, GC
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING EXPERTYARD_STEP_TIMES=1
date -u
for i in 1 2 3; do
  timeout 200 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 \
    --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --prompt-len 256 --decode-tokens 32 \
    --async-scheduling on --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1 \
    --out $OUT/coloc_rep$i.json > $OUT/coloc_rep$i.txt 2>&1
  grep -A3 "^batch" $OUT/coloc_rep$i.txt
done
grep -h -E "step times|garbage|\(device span\)|wait|enqueue" $OUT/coloc_rep*.txt | head -60
date -u
