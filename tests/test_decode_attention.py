"""Decode attention against a naive float64 loop: the Triton kernel's logic under the interpreter and the SDPA
path of layers/attention.py on the CPU; the compiled kernel is tested in tests/gpu/test_decode_attention_gpu.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertyard.kernels.decode_attention import decode_attention, kernel_supports
from expertyard.layers.attention import attend
from expertyard.layers.attention_metadata import AttentionMetadata, PrefillSpan

# B = sequences, H = query heads, G = KV heads, Dk/Dv = head dims, S = cache slots, L = cache length

MIXED_LENS = [1, 15, 16, 17, 300]


def reference(q, k_cache, v_cache, slots, context_lens, scale, window=None) -> torch.Tensor:
    """Float64 [B, H, Dv]: a loop over sequences and query heads, plain softmax over the visible keys."""
    b_num, h_num, _ = q.shape
    group = h_num // k_cache.shape[2]
    out = torch.empty(b_num, h_num, v_cache.shape[3], dtype=torch.float64)
    for b in range(b_num):
        slot, n = int(slots[b]), int(context_lens[b])
        first = 0 if window is None else max(0, n - window)
        for h in range(h_num):
            k = k_cache[slot, first:n, h // group].double().cpu()  # [n', Dk]
            v = v_cache[slot, first:n, h // group].double().cpu()  # [n', Dv]
            scores = (k @ q[b, h].double().cpu()) * scale  # [n']
            p = torch.exp(scores - scores.max())
            out[b, h] = (p / p.sum()) @ v
    return out


def make_case(lens, h, g, dk, dv, dtype, cache_len=None, latent=False, seed=0, device="cpu") -> dict:
    """Random q and caches; slots picked out of order from twice as many slots as sequences. Cache entries no
    sequence may see (unused slots, positions past each length) hold large finite values, so a kernel that
    reads them is far off. latent: v_cache is k_cache[..., :Dv], as absorbed MLA passes it (G = 1)."""
    gen = torch.Generator().manual_seed(seed)
    b, s = len(lens), 2 * len(lens)
    cache_len = cache_len or max(lens)
    k_cache = 30 * torch.randn(s, cache_len, g, dk, generator=gen)  # [S, L, G, Dk]
    v_cache = 30 * torch.randn(s, cache_len, g, dv, generator=gen)  # [S, L, G, Dv]
    slots = torch.randperm(s, generator=gen)[:b]  # [B]
    for slot, n in zip(slots.tolist(), lens):
        k_cache[slot, :n] /= 30
        v_cache[slot, :n] /= 30
    k_cache, v_cache = k_cache.to(device, dtype), v_cache.to(device, dtype)
    if latent:
        v_cache = k_cache[..., :dv]
    return dict(q=torch.randn(b, h, dk, generator=gen).to(device, dtype), k_cache=k_cache, v_cache=v_cache,
                slots=slots.to(device), context_lens=torch.tensor(lens, device=device), scale=dk**-0.5)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()


# name: (lens, H, G, Dk, Dv, window, splits (None: the kernel's heuristic), cache length, latent)
INTERPRETER_CASES = {
    "mha-h-eq-g": (MIXED_LENS, 4, 4, 64, 64, None, None, None, False),
    "gqa4": (MIXED_LENS, 8, 2, 128, 128, None, None, None, False),
    "gqa8": (MIXED_LENS, 16, 2, 64, 64, None, None, None, False),
    "dk96-dv48": (MIXED_LENS, 8, 2, 96, 48, None, None, None, False),  # Dk = 64 + 32 (tail block), Dv masked
    "mla-like": ([1, 17, 300], 16, 1, 576, 512, None, None, None, True),  # 576 = 512 + 64, V a view of K
    "group64-head-blocks": ([1, 17, 40], 64, 1, 32, 256, None, None, None, False),  # 2 programs per KV head
    "window16": (MIXED_LENS, 8, 2, 64, 64, 16, None, None, False),
    "window100-split3": (MIXED_LENS, 8, 2, 64, 64, 100, 3, None, False),  # empty splits for short lengths
    "split37-mostly-empty": (MIXED_LENS, 8, 2, 64, 64, None, 37, None, False),
    "split4-mixed": (MIXED_LENS, 8, 4, 64, 32, None, 4, 512, False),
    "b1-long-split-heuristic": ([4096], 8, 2, 64, 64, None, None, 4096, False),  # 64 splits of 64 keys
}
INTERPRETER_DTYPES = {torch.float32: 1e-5, torch.float16: 1e-3}  # max |error| / max |ref|; no bf16 (see below)

INTERPRETER_SCRIPT = r"""
import sys
import torch
from expertyard.kernels.decode_attention_triton import decode_attention_triton
cases = torch.load(sys.argv[1])
outs = {}
for name, c in cases.items():
    out = torch.empty(*c["q"].shape[:2], c["v_cache"].shape[3], dtype=c["q"].dtype)
    outs[name] = decode_attention_triton(c["q"], c["k_cache"], c["v_cache"], c["slots"], c["context_lens"],
                                         c["scale"], c["window"], out, c["splits"])
torch.save(outs, sys.argv[2])
"""


def test_triton_kernel_under_the_interpreter(tmp_path):
    """The kernel's logic on the CPU (TRITON_INTERPRET=1; float32 and float16: the interpreter's bf16 dot is
    wrong): GQA ratios 1-64, Dk != Dv, mixed lengths, slot indirection, windows, split-K (forced and chosen)."""
    pytest.importorskip("triton")
    cases, refs = {}, {}
    for name, (lens, h, g, dk, dv, window, splits, cache_len, latent) in INTERPRETER_CASES.items():
        for dtype in INTERPRETER_DTYPES:
            c = make_case(lens, h, g, dk, dv, dtype, cache_len, latent)
            cases[name, dtype] = {**c, "window": window, "splits": splits}
            refs[name, dtype] = reference(**c, window=window)
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(tmp_path / "cases.pt"),
                          str(tmp_path / "outs.pt")], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "interpret" in run.stderr.lower() and "not supported" in run.stderr.lower():
        pytest.skip(f"this triton cannot interpret the kernel: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    outs = torch.load(tmp_path / "outs.pt")
    errors = {key: relative_error(outs[key], refs[key]) for key in cases}
    bad = {f"{name}-{dtype}": err for (name, dtype), err in errors.items() if err >= INTERPRETER_DTYPES[dtype]}
    assert not bad, f"max |error| / max |ref| over the tolerance: {bad}"


def test_split_heuristic_depends_on_shapes_only():
    pytest.importorskip("triton")
    from expertyard.kernels.decode_attention_triton import block_config, num_splits

    assert num_splits(batch=1, programs_per_seq=4, cache_len=4096, num_sms=132) == 64  # 256 programs
    assert num_splits(batch=4, programs_per_seq=4, cache_len=4096, num_sms=132) == 16
    assert num_splits(batch=32, programs_per_seq=4, cache_len=1024, num_sms=132) == 2
    assert num_splits(batch=128, programs_per_seq=4, cache_len=4096, num_sms=132) == 1
    assert num_splits(batch=1, programs_per_seq=4, cache_len=200, num_sms=132) == 2
    assert num_splits(batch=1, programs_per_seq=4, cache_len=100, num_sms=132) == 1  # too short to split
    assert num_splits(batch=1, programs_per_seq=1, cache_len=1 << 20, num_sms=132) == 64  # capped
    cfg = block_config(group=16, dk=576, dv=512, elem_size=2)
    assert (cfg["BLOCK_H"], cfg["BLOCK_DK"], cfg["BLOCK_DT"], cfg["BLOCK_DV"]) == (16, 512, 64, 512)
    assert block_config(group=128, dk=576, dv=512, elem_size=2)["BLOCK_H"] == 16  # 8 head blocks per KV head


def test_decode_attention_takes_cuda_tensors_only():
    c = make_case([3, 5], 4, 2, 16, 16, torch.float32)
    assert not kernel_supports(c["q"], c["k_cache"], c["v_cache"])
    with pytest.raises(ValueError, match="CUDA"):
        decode_attention(**c)


@pytest.mark.parametrize("name", ["mha-h-eq-g", "gqa4", "dk96-dv48", "mla-like", "window16"])
def test_sdpa_path_matches_reference(name):
    """layers/attention.py's CPU path (SDPA over a gathered cache) on a step with a prefill span before the
    decode tokens; the decode rows against the float64 loop."""
    lens, h, g, dk, dv, window, _, _, latent = INTERPRETER_CASES[name]
    c = make_case(lens, h, g, dk, dv, torch.float32, latent=latent)
    n0, prefill_slot = 3, int(c["slots"][0])  # prefill rows only shift the decode rows: not checked here
    q = torch.cat((torch.randn(n0, h, dk), c["q"]))  # [3 + B, H, Dk]
    meta = AttentionMetadata(token_slots=torch.cat((torch.full((n0,), prefill_slot), c["slots"])),
                             positions=torch.cat((torch.arange(n0), c["context_lens"] - 1)),
                             prefills=[PrefillSpan(slot=prefill_slot, start=0, length=n0, offset=0)],
                             num_prefill_tokens=n0, decode_slots=c["slots"], decode_context_lens=c["context_lens"],
                             decode_max_len=max(lens))
    out = attend(q, c["k_cache"], c["v_cache"], meta, c["scale"], window)  # [3 + B, H, Dv]
    ref = reference(**c, window=window)
    assert relative_error(out[n0:], ref) < 1e-5
