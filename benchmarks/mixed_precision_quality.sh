#!/usr/bin/env bash
# Issue 4's quality table (docs/mixed-precision.md): the bundled model on its held-out text, offloaded with a
# cache of 25% of the experts, one token per step (as decode meets the cache), for full precision, mixed
# (int4 low copies, thresholds 0.6,0.9) and all-int8/int4/int2; perplexity and greedy agreement with full
# precision over 256 tokens. float32, on a CPU (about 25 minutes on 2 cores) or a GPU.
#   python scripts/write_heldout.py --corpus-dir ../shared/data/corpora --out .data/heldout
#   OUT=/tmp/quality bash benchmarks/mixed_precision_quality.sh
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-src} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # small CPU ops: threads only contend
OUT=${OUT:-/tmp/expertyard-quality}
HELD=${HELD:-.data/heldout}
TOKENS=${TOKENS:-1025}
PROMPTS=${PROMPTS:-2}
mkdir -p "$OUT"
cli() { python3 -m expertyard.entrypoints.cli "$@"; }
EVAL=(--max-tokens "$TOKENS" --window 1024 --stride 1024 --dtype float32 --json)
OFF=(--offload --expert-cache-fraction 0.25 --policy "${POLICY:-lru}" --token-by-token)
for text in tinystories shakespeare; do
  cli eval --text "$HELD/$text.txt" "${EVAL[@]}" > "$OUT/${text}_full.json"
  agree=()
  [[ $text == tinystories ]] && agree=(--agreement-tokens 256 --agreement-prompts "$PROMPTS")
  cli eval --text "$HELD/$text.txt" "${EVAL[@]}" "${OFF[@]}" --low-precision int4 "${agree[@]}" > "$OUT/${text}_mixed_int4.json"
  for bits in 8 4 2; do
    cli eval --text "$HELD/$text.txt" "${EVAL[@]}" "${OFF[@]}" --low-precision int$bits --precision low "${agree[@]}" \
      > "$OUT/${text}_all_int$bits.json"
  done
done
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| text | configuration | perplexity | vs full | pairs full / low / skipped | top-1 agreement (256 tok) | identical prefix |")
for text in ("tinystories", "shakespeare"):
    full = json.load(open(os.path.join(out, f"{text}_full.json")))["perplexity"]
    for name in ("full", "mixed_int4", "all_int8", "all_int4", "all_int2"):
        r = json.load(open(os.path.join(out, f"{text}_{name}.json")))
        off = r.get("offload", {})
        fr = "/".join(f"{off[f'pairs_{k}_fraction']:.3f}" for k in ("full", "low", "skipped")) if off else "1/0/0"
        agree = f"{r['teacher_forced_agreement']:.3f}" if "teacher_forced_agreement" in r else "-"
        prefix = f"{r['identical_prefix_mean']:.1f}" if "identical_prefix_mean" in r else "-"
        print(f"| {text} | {name} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / full - 1):+.2f}% | {fr} | {agree} | {prefix} |")
PY
