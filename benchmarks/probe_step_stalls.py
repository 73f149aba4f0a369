"""Find first-use stalls of a serving engine after its warm-up (issue 5's 8x target).

Replays the serving benchmark's traffic directly on the engine (no HTTP): `--streams` concurrent requests of
`--input-len` random tokens and `--output-len` new tokens, a new one joining whenever one ends, after the
server's warm-up. Reports every step slower than `--slow-ms` with its composition, and every Triton compile
that happened after the warm-up (with the step it stalled), then the same for fresh SDPA shapes of the
padded multi-prompt prefill (first call vs second call), so that a stall can be put on its cause.

    PYTHONPATH=src python benchmarks/probe_step_stalls.py --synthetic olmoe-1b-7b --max-num-seqs 32 \
        --max-model-len 1024 --streams 32 --requests 200
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from expertyard.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from expertyard.engine.sampling_params import SamplingParams  # noqa: E402
from expertyard.server.warmup import warm_up  # noqa: E402
from expertyard.synthetic import build_synthetic  # noqa: E402

COMPILES: list[tuple[float, str]] = []


def _watch_triton_compiles() -> str:
    """Record every Triton compile (kernel name, time); returns which hook was available."""
    import triton

    def hook(*args, **kwargs):
        info = kwargs.get("fn")  # JitFunctionInfo (name, module, jit_function) in Triton 3.x
        name = getattr(info, "name", None) or str(kwargs.get("repr") or kwargs.get("key", "?"))[:80]
        COMPILES.append((time.perf_counter(), name))
        return False  # never claims the compile: Triton compiles as usual

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
        knobs.runtime.jit_cache_hook = hook
        return "triton.knobs.runtime.jit_cache_hook"
    from triton.runtime.jit import JITFunction

    JITFunction.cache_hook = hook
    return "JITFunction.cache_hook"


def replay(engine: LLMEngine, streams: int, requests: int, input_len: int, output_len: int, slow_s: float):
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    started = running = 0
    steps, slow = [], []

    def add():
        nonlocal started, running
        engine.add_request([rng.randrange(vocab) for _ in range(input_len)], params)
        started += 1
        running += 1

    for _ in range(min(streams, requests)):
        add()
    t_run = time.perf_counter()
    while engine.has_unfinished():
        before = len(COMPILES)
        t0 = time.perf_counter()
        done = engine.step()
        dt = time.perf_counter() - t0
        st = engine.last_step
        shape = f"{sum(s.length for s in st.prefills)} prefill tokens ({len(st.prefills)} prompts) + {len(st.decodes)} decodes"
        steps.append(dt)
        if dt > slow_s:
            slow.append((len(steps), dt, shape, [n for _, n in COMPILES[before:]]))
        for seq in done:
            if seq.finished:
                running -= 1
                if started < requests:
                    add()
    return time.perf_counter() - t_run, steps, slow


def sdpa_first_use(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> list[tuple]:
    """First vs second call of the padded prefill's SDPA (bool mask) on shapes the warm-up never ran."""
    import torch.nn.functional as F

    rows = []
    for b, lq in ((5, 96), (11, 128), (16, 128), (31, 64)):
        q = torch.randn(b, heads, lq, head_dim, device=device, dtype=dtype)
        mask = torch.ones(b, 1, lq, lq, device=device, dtype=torch.bool).tril()
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append((b, lq, times[0] * 1e3, times[1] * 1e3))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", default="olmoe-1b-7b")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--slow-ms", type=float, default=100.0)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (no SDPA probe)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hook = _watch_triton_compiles()
    loaded = build_synthetic(args.synthetic, args.num_layers, device, dtype)
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                                  max_num_batched_tokens=args.max_num_batched_tokens),
                       eos_token_ids=set())
    t_warm = warm_up(engine)
    warm_compiles = len(COMPILES)
    COMPILES.clear()
    wall, steps, slow = replay(engine, args.streams, args.requests, args.input_len, args.output_len,
                               args.slow_ms / 1e3)
    cfg = engine.model_config
    sdpa = sdpa_first_use(device, dtype, cfg.attention.num_heads, cfg.attention.head_dim) if device.type == "cuda" else []
    print(f"\n# stall probe: {args.synthetic}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"compile hook {hook}")
    print(f"warm-up {t_warm:.1f} s, {warm_compiles} Triton compiles in it")
    print(f"replay: {args.requests} requests, {args.streams} streams, {len(steps)} steps in {wall:.1f} s; "
          f"{len(COMPILES)} Triton compiles after the warm-up; {len(slow)} steps over {args.slow_ms:.0f} ms "
          f"({sum(s[1] for s in slow):.2f} s of {sum(steps):.2f} s)")
    for n, dt, shape, compiled in slow:
        print(f"  step {n}: {dt * 1e3:.0f} ms  {shape}  compiles: {compiled or '-'}")
    print("SDPA first use (bool mask, fresh shapes): B, Lq, first ms, second ms")
    for row in sdpa:
        print("  %d %d %.1f %.2f" % row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
