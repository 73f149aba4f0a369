"""Add the exchange term T_x to a profile written by `plan calibrate` before T_x existed, from the
null-deployment data the profile already records (its "step" fit: T_layer per batch). No new measurement.

    python benchmarks/rederive_exchange_term.py PROFILE.json OUT.json --synthetic mixtral-8x7b [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from expertyard.bench.plan_calibrate import with_exchange_term
from expertyard.plan.model_costs import model_costs
from expertyard.plan.model_specs import model_config_for
from expertyard.plan.profiles import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--synthetic", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    step = next(f for f in profile.fits if f["module"] == "step")
    null = {"note": None, "prompt_len": step["prompt_len"], "decode_tokens": step["decode_tokens"]}
    elt = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    out = with_exchange_term(profile, model_costs(model_config_for(args.synthetic), elt), null,
                              [tuple(p) for p in step["layer"]])
    args.out.write_text(out.to_json() + "\n")
    print(f"{args.out}: T_x(b) = {out.exchange_overhead_us:.1f} us + {out.exchange_overhead_per_token_us:.3f} us * b")


if __name__ == "__main__":
    main()
