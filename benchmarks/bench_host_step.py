"""Host work of one decode step on the driver, side by side in one run (CPU, no model):
- the step plan: `plan_step`'s loop over spans and its array code, at several batch sizes;
- a sequence's output text: a whole decode of its output against one incremental step (engine/detokenizer.py).

    python benchmarks/bench_host_step.py [--batches 1,8,64,512,2048] [--output-tokens 500]
"""

from __future__ import annotations

import argparse
import time

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.step_plan import _split_arrays, _split_loop
from expertyard.engine.detokenizer import IncrementalDetokenizer
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.scheduler import Scheduler
from expertyard.engine.sequence import Sequence
from expertyard.entrypoints.common import bundled_model_path, load_tokenizer


def per_call_us(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e6


def decode_step(batch: int, prompt_len: int = 64):
    """A decode step of `batch` sequences, as the scheduler makes it after their prefill."""
    sched = Scheduler(batch, batch * prompt_len)
    for _ in range(batch):
        sched.add(Sequence(list(range(prompt_len)), SamplingParams()))
    for span in sched.schedule().spans:  # the prefill: every prompt, then its first token
        span.seq.num_computed += span.length
        span.seq.token_ids.append(1)
    return sched.schedule()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,64,512,2048")
    ap.add_argument("--output-tokens", type=int, default=500)
    args = ap.parse_args()
    cfg = DisaggConfig(attention_ranks=2, expert_ranks=2, micro_batches=2)
    print(f"{'batch':>6} {'plan: loop us':>14} {'plan: arrays us':>16}   (2 attention ranks, m = 2, decode step)")
    for b in (int(x) for x in args.batches.split(",")):
        step = decode_step(b)
        repeats = max(5, 20000 // b)
        loop = per_call_us(lambda: _split_loop(step, cfg, b, False, 2), repeats)
        arrays = per_call_us(lambda: _split_arrays(step, cfg, b, False, 2), repeats)
        print(f"{b:>6} {loop:>14.1f} {arrays:>16.1f}")
    tok = load_tokenizer(bundled_model_path())
    out = [100 + i % 5000 for i in range(args.output_tokens)]
    whole = per_call_us(lambda: tok.decode(out, skip_special_tokens=True), 200)
    detok = IncrementalDetokenizer(tok)
    for n in range(1, len(out)):  # the stream so far, one token per step
        detok.update(out[:n])

    def one_step():  # the last token's step, from the state before it (undone after each call)
        state = (detok.prefix, detok.read, detok.text)
        detok.update(out)
        detok.prefix, detok.read, detok.text = state

    incremental = per_call_us(one_step, 200)
    print(f"output text of one sequence at {len(out)} tokens (bundled tokenizer): whole decode {whole:.1f} us, "
          f"incremental step {incremental:.1f} us")


if __name__ == "__main__":
    main()
