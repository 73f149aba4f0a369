"""Predicted vs measured decode TPOT: `expertyard plan predict` (`--mode colocated` for colocated runs) with
calibrated profiles for every run of `expertyard bench --disaggregate` JSON results; prints a markdown table
(docs/plan.md).

    python benchmarks/plan_vs_measured.py --profiles A.json,B.json --model mixtral-8x7b --num-layers 8 \
        RESULT.json[:CONTEXT] ...      (CONTEXT: mean cached tokens of the timed steps; default prompt + decode/2)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def predict(profile: str, model: str, layers: int, n_a: int, n_e: int, m: int, batch: int, context: int,
            async_scheduling: bool = False, mode: str = "disaggregated") -> float | None:
    argv = [sys.executable, "-m", "expertyard.entrypoints.cli", "plan", "predict", "--synthetic", model,
            "--num-layers", str(layers), "--attention-ranks", str(n_a), "--expert-ranks", str(n_e),
            "--micro-batches", str(m), "--batch", str(batch), "--context-len", str(context), "--profile", profile,
            "--mode", mode, "--json"] + (["--async-scheduling"] if async_scheduling else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:  # e.g. experts that the expert ranks cannot split evenly: the model refuses
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["tpot_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", required=True, help="comma-separated profile JSONs, one column pair each")
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-layers", type=int, required=True)
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    profiles = args.profiles.split(",")
    head = "| GPUs | deployment, batch, context | m | async | measured TPOT ms |" + \
        "".join(f" predicted ({Path(p).stem}) | measured / predicted |" for p in profiles)
    print(head)
    print("|---:|---|---:|---|---:|" + "---:|---:|" * len(profiles))
    for spec in args.results:
        path, _, ctx = spec.partition(":")
        r = json.loads(Path(path).read_text())
        mode = r.get("mode", "disaggregated")
        n_a, n_e = (r["gpus"], 0) if mode == "colocated" else (r["attention_ranks"], r["expert_ranks"])
        context = int(ctx) if ctx else r["prompt_len"] + r["decode_tokens"] // 2
        for run in r["runs"]:
            m, b = run["micro_batches"], run["batch"]
            if b % (n_a * m):
                continue  # the model takes batches divisible by n_a m only
            a = run.get("async_scheduling", False)
            cells = ""
            for p in profiles:
                t = predict(p, args.model, args.num_layers, n_a, n_e, m, b, context, a, mode)
                cells += " not modelled | |" if t is None else f" {t:.2f} | {run['tpot_ms'] / t:.2f} |"
            what = f"colocated {n_a}" if mode == "colocated" else f"{n_a} + {n_e}"
            print(f"| {n_a + n_e} | {what}, {b}, {context} | {m} | {'on' if a else 'off'} | "
                  f"{run['tpot_ms']:.2f} |{cells}")


if __name__ == "__main__":
    main()
