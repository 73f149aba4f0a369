# session 7 run 4 (4 x H200): steps d and e (8 layers) with this session's fused-MoE blocks, async off and on;
# colocated at larger batches (same-TPOT comparison)
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHELASTIC_ERROR_FILE= LOGLEVEL=WARNING
date -u
quiet() { grep -v -e "torchelastic" -e "^INFO" -e "^W[0-9]" -e "it/s"; }
bench() {  # name, then flags
  local name=$1; shift
  timeout 300 python3 -m expertyard.entrypoints.cli bench --disaggregate --device cuda --dist-timeout 120 "$@" \
    --out "$OUT/$name.json" 2>&1 | quiet | tail -8 | tee -a "$OUT/log.txt"
}
for P in 256 1024; do
  S=(--synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2048 --prompt-len $P --decode-tokens 32
     --async-scheduling both)
  bench p${P}_pingpong_2x2 "${S[@]}" --mode disaggregated --attention-ranks 2 --expert-ranks 2 --micro-batches 1,2
  bench p${P}_colocated_4 "${S[@]}" --mode colocated --attention-ranks 2 --expert-ranks 2 --micro-batches 1
done
bench p256_colocated_4_larger --synthetic mixtral-8x7b --num-layers 8 --dtype bfloat16 --batch-sizes 2560,3072 \
  --prompt-len 256 --decode-tokens 32 --async-scheduling on --mode colocated --attention-ranks 2 --expert-ranks 2 \
  --micro-batches 1
date -u
