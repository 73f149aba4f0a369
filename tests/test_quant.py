"""Group-wise quantization, packed experts, the torch FFN path and `expertyard quantize` (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.errors import CheckpointError, ConfigError
from expertyard.kernels.fused_moe import fused_moe_reference
from expertyard.quant import (ExpertLayout, dequantize, dequantize_expert, expert_ffn_quantized_reference,
                              expert_views, fused_moe_quantized, new_pool, pack_codes, pack_expert, quantize,
                              unpack_codes)
from expertyard.quant.groupwise import quantized_nbytes

# N = rows (outputs), K = input columns, G = group size, D = hidden, I = expert intermediate, S = slots

MIB = 2**20


def error_bound(w: torch.Tensor, q) -> tuple[torch.Tensor, torch.Tensor]:
    """(|w - dequantize(q)| in float64, the round-to-nearest bound scale/2 per element) as [N, K]."""
    n, k = w.shape
    err = (w.double() - dequantize(q, torch.float64)).abs()
    half_step = q.scale.double().T.repeat_interleave(q.group_size, dim=1) / 2  # [N, K]
    return err, half_step * (1 + 1e-6) + 1e-7 * w.double().abs() + 1e-12


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [16, 64, 128])
def test_error_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(bits * 1000 + group)
    w = torch.randn(48, 256, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[3, :group] = 0.3  # a constant group
    w[5, 7] = 40.0  # an outlier
    q = quantize(w, bits, group)
    err, bound = error_bound(w, q)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    assert q.packed.dtype == torch.uint8 and tuple(q.packed.shape) == (48, 256 * bits // 8)
    assert q.scale.dtype == torch.float16 and tuple(q.scale.shape) == (256 // group, 48)
    assert q.nbytes == quantized_nbytes(48, 256, bits, group)


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 9), groups=st.integers(1, 4), bits=st.sampled_from([8, 4, 2]),
       group=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(1e-4, 1e3), offset=st.floats(-100, 100))
def test_error_bound_hypothesis(n, groups, bits, group, seed, scale, offset):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * group, generator=g) * scale + offset
    err, bound = error_bound(w, quantize(w, bits, group))
    assert (err <= bound).all()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 12), groups=st.integers(1, 3), bits=st.sampled_from([8, 4, 2]),
       group=st.sampled_from([8, 16, 64]), data=st.data())
def test_pack_unpack_round_trip(n, groups, bits, group, data):
    k = groups * group
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n * k, max_size=n * k))
    codes = torch.tensor(values, dtype=torch.uint8).view(n, k)
    packed = pack_codes(codes, bits, group)
    assert tuple(packed.shape) == (n, k * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, group), codes)


def test_packing_is_little_endian_bit_planes_per_group():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)  # one row, K = 8, one group of 8
    # 2 bits: GB = 2 bytes; byte r holds columns r, r + 2, r + 4, r + 6 from the low bits up
    assert pack_codes(codes, 2, 8)[0].tolist() == [1 | 3 << 2 | 3 << 4 | 3 << 6, 2 | 0 << 2 | 3 << 4 | 3 << 6]
    # 4 bits: GB = 4 bytes; byte r holds columns r (low nibble) and r + 4 (high nibble)
    assert pack_codes(codes, 4, 8)[0].tolist() == [1 | 3 << 4, 2 | 3 << 4, 3 | 3 << 4, 0 | 3 << 4]
    assert pack_codes(codes, 8, 8)[0].tolist() == codes[0].tolist()
    two_groups = torch.cat([codes, codes + 4 * (codes < 12)], dim=1)  # K = 16, groups of 8 packed one by one
    assert pack_codes(two_groups, 4, 8)[0, 4:].tolist() == pack_codes(two_groups[:, 8:], 4, 8)[0].tolist()


def test_error_orders_int8_int4_int2_and_group_sizes():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    rms = {(b, gs): (dequantize(quantize(w, b, gs)) - w).pow(2).mean().sqrt().item()
           for b in (8, 4, 2) for gs in (64, 128)}
    for gs in (64, 128):
        assert rms[8, gs] < rms[4, gs] / 8 < rms[2, gs] / 16
    for b in (8, 4, 2):
        assert rms[b, 64] < rms[b, 128]
    assert 0.05 < rms[4, 64] < 0.12 and 0.2 < rms[2, 64] < 0.5  # w ~ N(0, 1): step = range / 15, range / 3


@pytest.mark.parametrize("bits", [4, 2])
def test_clip_search_never_worse_per_group_and_helps_int2(bits):
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    plain, clipped = quantize(w, bits, 64), quantize(w, bits, 64, clip_search=True)

    def group_sq_err(q):
        return (dequantize(q) - w).pow(2).reshape(128, 8, 64).sum(-1)

    assert (group_sq_err(clipped) <= group_sq_err(plain) * (1 + 1e-6) + 1e-12).all()
    gain = 1 - group_sq_err(clipped).sum().sqrt() / group_sq_err(plain).sum().sqrt()
    assert gain > (0.2 if bits == 2 else 0.02)
    assert (clipped.minimum.float() >= plain.minimum.float()).all()  # grids only shrink


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="group_size=64 does not divide the 48 input columns"):
        quantize(torch.randn(4, 48), 4, 64)
    with pytest.raises(ConfigError, match="bits=3"):
        quantize(torch.randn(4, 64), 3, 64)
    with pytest.raises(ConfigError, match="multiple of 8"):
        quantize(torch.randn(4, 60), 4, 12)
    with pytest.raises(ConfigError, match="inf or nan"):
        quantize(torch.tensor([[float("nan")] * 8]), 4, 8)
    with pytest.raises(ConfigError, match="float16"):
        quantize(torch.full((1, 8), 1e6), 4, 8)
    with pytest.raises(ConfigError, match="down projection"):
        ExpertLayout.build(128, 48, 4, 64)


@pytest.mark.parametrize("bits,mib", [(8, 178.5), (4, 94.5), (2, 52.5)])
def test_mixtral_expert_bytes(bits, mib):
    layout = ExpertLayout.build(4096, 14336, bits, 64)
    assert layout.bf16_nbytes == 336 * MIB
    assert layout.nbytes == mib * MIB  # codes + 4 bytes (fp16 scale and minimum) per 64 weights; sections aligned
    assert layout.nbytes % 128 == 0
    for name in ("w13_packed", "w2_packed", "w13_scale", "w13_minimum", "w2_scale", "w2_minimum"):
        assert getattr(layout, name) % 128 == 0
    assert ExpertLayout.from_json(layout.to_json()) == layout


def random_expert(d, i, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(i, d, generator=g) / d**0.5  # [I, D]
    up = torch.randn(i, d, generator=g) / d**0.5  # [I, D]
    down = torch.randn(d, i, generator=g) / i**0.5  # [D, I]
    return gate.to(dtype), up.to(dtype), down.to(dtype)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_expert_round_trip(bits):
    d, i, gs = 96, 64, 32
    gate, up, down = random_expert(d, i, bits, torch.bfloat16)
    layout = ExpertLayout.build(d, i, bits, gs)
    buf = pack_expert(gate, up, down, bits, gs)
    assert buf.dtype == torch.uint8 and tuple(buf.shape) == (layout.nbytes,)
    w13, w2 = dequantize_expert(buf, layout)
    for got, w in ((w13[:i], gate), (w13[i:], up), (w2, down)):  # each part equals quantizing it alone
        assert torch.equal(got, dequantize(quantize(w, bits, gs)))
    q13, q2 = expert_views(buf, layout)
    assert q13.packed.data_ptr() == buf.data_ptr() + layout.w13_packed  # views, not copies
    assert q2.minimum.data_ptr() == buf.data_ptr() + layout.w2_minimum
    pool = new_pool(3, layout, "cpu")
    pool[1].copy_(buf)  # one copy moves the expert into a slot
    assert torch.equal(dequantize_expert(pool[1], layout)[1], w2)


def ffn(x, w13, w2):
    i = w2.shape[1]
    gu = x @ w13.T
    return (F.silu(gu[:, :i]) * gu[:, i:]) @ w2.T


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_reference_ffn_is_dequantize_then_swiglu(bits):
    d, i, gs = 128, 64, 64
    layout = ExpertLayout.build(d, i, bits, gs)
    gate, up, down = random_expert(d, i, 1)
    buf = pack_expert(gate, up, down, bits, gs)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(bits))
    q13, q2 = quantize(torch.cat([gate, up]), bits, gs), quantize(down, bits, gs)
    want = ffn(x, dequantize(q13), dequantize(q2))
    torch.testing.assert_close(expert_ffn_quantized_reference(x, buf, layout), want, rtol=1e-5, atol=1e-6)
    exact = ffn(x, torch.cat([gate, up]), down)
    rel = ((want - exact).norm() / exact.norm()).item()
    assert rel < {8: 0.02, 4: 0.3, 2: 1.5}[bits]  # random experts; SwiGLU multiplies the errors of gate and up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_quantized_torch_matches_dequantized_fused_moe(dtype):
    d, i, gs, s, t, k = 64, 32, 16, 5, 9, 2
    layout = ExpertLayout.build(d, i, 4, gs)
    pool = new_pool(s, layout, "cpu")
    for e in range(s):
        pack_expert(*random_expert(d, i, 10 + e), 4, gs, out=pool[e])
    w13 = torch.stack([dequantize_expert(pool[e], layout)[0] for e in range(s)])  # [S, 2I, D]
    w2 = torch.stack([dequantize_expert(pool[e], layout)[1] for e in range(s)])  # [S, D, I]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, d, generator=g).to(dtype)
    ids = torch.rand(t, s, generator=g).argsort(dim=1)[:, :k]  # [T, K]
    ids[::3, 1] = -1  # not resident: skipped
    topk_w = torch.rand(t, k, generator=g).softmax(dim=-1)
    y = fused_moe_quantized(x, pool, layout, ids, topk_w)
    ref = fused_moe_reference(x.float(), w13, w2, ids.clamp(min=0), topk_w * (ids >= 0))
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    with pytest.raises(IndexError, match="slot_ids"):
        fused_moe_quantized(x, pool, layout, ids.clamp(max=s - 1) + 1, topk_w)
    with pytest.raises(ValueError, match="pool must be"):
        fused_moe_quantized(x, pool[:, :-2], layout, ids, topk_w)


TRITON_SCRIPT = r"""
import torch
from expertyard.quant import ExpertLayout, new_pool, pack_expert, fused_moe_quantized_torch
from expertyard.quant.triton_ffn import fused_moe_quantized_triton
torch.manual_seed(0)
worst = 0.0
for t, s, d, i, bits, gs, dtype, cfg in [
        (3, 4, 128, 64, 4, 64, torch.float32, None), (5, 3, 128, 64, 2, 64, torch.float32, None),
        (4, 3, 128, 96, 8, 32, torch.float32, None), (3, 4, 256, 128, 4, 128, torch.float16, None),
        (20, 3, 128, 192, 4, 32, torch.float32, dict(BLOCK_M=32, MAGIC=False,
            gate_up=dict(BLOCK_N=64, GPI=1, num_warps=4, num_stages=3),
            down=dict(BLOCK_N=32, GPI=2, num_warps=4, num_stages=3, SPLIT=2)))]:
    layout = ExpertLayout.build(d, i, bits, gs)
    pool = new_pool(s, layout, "cpu")
    for e in range(s):
        pack_expert(torch.randn(i, d) / d**.5, torch.randn(i, d) / d**.5, torch.randn(d, i) / i**.5, bits, gs,
                    out=pool[e])
    x = torch.randn(t, d).to(dtype)
    ids = torch.rand(t, s).argsort(1)[:, :2]
    ids[::2, 0] = -1
    w = torch.rand(t, 2).softmax(-1)
    y = fused_moe_quantized_triton(x, pool, layout, ids, w, cfg)
    ref = fused_moe_quantized_torch(x.float(), pool, layout, ids, w)
    worst = max(worst, ((y.float() - ref).norm() / ref.norm()).item() / (1e-5 if dtype == torch.float32 else 2e-3))
print(worst)
"""


def test_triton_kernel_under_the_interpreter():
    """The Triton kernels' logic on the CPU (TRITON_INTERPRET=1, float32 and float16: the interpreter's bf16 dot
    is wrong); the compiled kernels are tested on the GPU in tests/gpu/test_quant_kernels.py."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "interpret" in run.stderr.lower() and "not supported" in run.stderr.lower():
        pytest.skip(f"this triton cannot interpret the kernel: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split()[-1]) < 1.0  # relative error under 1e-5 (float32) and 2e-3 (float16)


# ---- expertyard quantize ---------------------------------------------------------------------------------


def quantize_cli(*args: str) -> tuple[int, str]:
    from expertyard.entrypoints.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["quantize", *args])
    return code, out.getvalue()


@pytest.mark.parametrize("arch,group", [("mixtral", 16), ("qwen3_moe", 32)])
def test_quantize_command_end_to_end(tiny_checkpoint, tmp_path, arch, group):
    from expertyard.loader.load import load_model
    from expertyard.quant.store import load_quantized_experts, router_hash

    path, hf = tiny_checkpoint(arch)
    out = tmp_path / "q"
    code, stdout = quantize_cli("--model", str(path), "--bits", "4,2", "--group-size", str(group),
                                "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert [f["bits"] for f in summary["files"]] == [4, 2]
    assert (out / "experts.int4.safetensors").is_file() and (out / "experts.int2.safetensors").is_file()
    from safetensors.torch import load_file

    assert len(load_file(out / "experts.int4.safetensors")) == summary["experts"]  # a valid safetensors file

    model = load_model(path, "cpu", torch.float32)
    cfg = model.config
    experts = load_quantized_experts(out, 4, model=model.model)
    assert summary["router_sha256"] == router_hash(model.model)
    assert experts.layout == ExpertLayout.build(cfg.hidden_size, cfg.moe.intermediate_size, 4, group)
    assert experts.metadata["architecture"] == cfg.architecture
    assert set(experts) == {(l, e) for l in cfg.moe_layers for e in range(cfg.moe.num_experts)}
    backend = model.model.experts  # resident: w13 [E, 2I, D], w2 [E, D, I]
    i = cfg.moe.intermediate_size
    for (layer, e), buf in list(experts.items())[:6]:
        w13, w2 = backend.w13[layer][e], backend.w2[layer][e]
        assert torch.equal(buf, pack_expert(w13[:i], w13[i:], w2, 4, group))  # exactly what re-quantizing gives

    # a file made for another model is refused: other shapes, or same shapes with other router weights
    other, _ = tiny_checkpoint("olmoe")
    with pytest.raises(CheckpointError, match="another model"):
        load_quantized_experts(out, 4, model=load_model(other, "cpu", torch.float32).model)
    with torch.no_grad():
        model.model.layers[cfg.moe_layers[-1]].mlp.gate.weight[0, 0] += 1.0
    with pytest.raises(CheckpointError, match="router hash"):
        load_quantized_experts(out, 2, model=model.model)
    with pytest.raises(CheckpointError, match="experts.int8.safetensors: no such file"):
        load_quantized_experts(out, 8)


def test_quantize_command_clip_search(tiny_checkpoint, tmp_path):
    from expertyard.loader.load import load_model
    from expertyard.quant.store import load_quantized_experts

    path, _ = tiny_checkpoint("qwen3_moe")
    code, _ = quantize_cli("--model", str(path), "--bits", "2", "--group-size", "32", "--clip-search",
                           "--out", str(tmp_path), "--json")
    assert code == 0
    loaded = load_model(path, "cpu", torch.float32)
    experts = load_quantized_experts(tmp_path, 2, model=loaded.model)
    assert experts.metadata["rounding"] == "nearest, clip search"
    layer, i = loaded.config.moe_layers[0], loaded.config.moe.intermediate_size
    w13, w2 = loaded.model.experts.w13[layer][3], loaded.model.experts.w2[layer][3]
    assert torch.equal(experts[layer, 3], pack_expert(w13[:i], w13[i:], w2, 2, 32, clip_search=True))


def test_quantize_command_errors(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint("mixtral")  # I = 48
    code, _ = quantize_cli("--model", str(path), "--bits", "4", "--out", str(tmp_path / "q"))
    assert code == 2 and "group_size=64 does not divide the 48" in capsys.readouterr().err
    code, _ = quantize_cli("--model", str(path), "--bits", "4,3", "--out", str(tmp_path / "q"))
    assert code == 2 and "--bits '4,3'" in capsys.readouterr().err
    code, _ = quantize_cli("--model", str(path), "--bits", "4", "--group-size", "16", "--out", str(path))
    assert code == 2 and "is the model directory" in capsys.readouterr().err
    assert not list(tmp_path.glob("q/*.tmp"))
