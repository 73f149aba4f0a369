"""Parity table: expertyard vs transformers on tiny random checkpoints of every architecture.

    python benchmarks/parity_table.py [--device cpu|cuda] [--dtype float32|bfloat16]

For each architecture: max |logit difference| over a 16-token prefill plus 16 greedy decode steps (each decode
step's logits from expertyard's KV-cached step, the reference from one full transformers forward), and whether
the greedy tokens equal those of transformers' `generate`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ARCH_CASES, build_hf_model  # noqa: E402

from expertyard.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from expertyard.engine.sampling_params import SamplingParams  # noqa: E402
from expertyard.engine.scheduler import ScheduledSpan, ScheduledStep  # noqa: E402
from expertyard.engine.sequence import Sequence  # noqa: E402
from expertyard.loader import load_model  # noqa: E402


def measure(name: str, device: str, dtype: torch.dtype, prompt_len: int = 16, steps: int = 16) -> dict:
    hf = build_hf_model(name)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        loaded = load_model(Path(d), device, dtype, progress=False)
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=1, max_model_len=128, cuda_graphs=False), set())
    prompt = torch.randint(3, 128, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=steps))[0]
    with torch.no_grad():
        ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, prompt_len:].tolist()
        ref_logits = hf(torch.tensor([seq.token_ids])).logits[0, :-1]  # [L - 1, V]
    # expertyard logits of every position: one prefill span with all logits, then one cached decode step each
    s = Sequence(prompt_token_ids=seq.token_ids[:prompt_len], params=SamplingParams(), token_ids=list(seq.token_ids))
    s.slot = 0
    ours = [engine.runner.run(ScheduledStep([ScheduledSpan(s, 0, prompt_len)], []), all_logits=True)]
    for pos in range(prompt_len, len(seq.token_ids) - 1):
        ours.append(engine.runner.run(ScheduledStep([], [ScheduledSpan(s, pos, 1)]), all_logits=True))
    ours = torch.cat(ours).float().cpu()
    return {"arch": name, "max_abs_logit_err": float((ours - ref_logits).abs().max()),
            "logit_scale": float(ref_logits.abs().max()), "greedy_equal": seq.output_token_ids == ref_tokens}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"| architecture (tiny random config) | max abs logit error | max abs logit | greedy tokens equal |")
    print("|---|---|---|---|")
    for name in ARCH_CASES:
        r = measure(name, args.device, dtype)
        print(f"| {r['arch']} | {r['max_abs_logit_err']:.2e} | {r['logit_scale']:.2f} | {r['greedy_equal']} |")


if __name__ == "__main__":
    main()
