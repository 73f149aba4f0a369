#!/bin/bash
# session 6, run 5: step e (prompt 1024) with async scheduling off/on (2+2 and colocated), then a profiled
# 2+2 m=2 async run at batch 2048, prompt 256 (steps 110-111: two decode steps of the timed pass)
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
B=(python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --decode-tokens 32)
timeout 300 "${B[@]}" --prompt-len 1024 --async-scheduling both --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2 --out $OUT/long_pingpong_2x2.json 2>&1 | quiet > $OUT/log.txt
timeout 200 "${B[@]}" --prompt-len 1024 --async-scheduling both --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1 --out $OUT/long_colocated_4.json 2>&1 | quiet >> $OUT/log.txt
cat $OUT/log.txt
mkdir -p $OUT/prof
EXPERTYARD_PROFILE_STEPS=110:112 EXPERTYARD_PROFILE_DIR=$OUT/prof timeout 200 "${B[@]}" --prompt-len 256 --async-scheduling on --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 2 --out /tmp/profiled.json > /tmp/prof_log.txt 2>&1
python3 benchmarks/trace_phases.py $OUT/prof/rank*_steps*.json.gz --step-window 22000 > $OUT/phases.txt 2>&1
grep -v "^W\|INFO" /tmp/prof_log.txt | tail -200 >> $OUT/phases.txt; head -30 $OUT/phases.txt
date -u
