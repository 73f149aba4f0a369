"""The Triton low-precision expert FFN (quant/triton_ffn.py) against dequantize-then-matmul in float32, eagerly and
after a CUDA-graph replay, at small and real (Mixtral-8x7B, Qwen3-30B-A3B) expert shapes."""

import pytest
import torch

if not torch.cuda.is_available():  # CPU machines (CI) may have no triton at all
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from expertyard.kernels.fused_moe import fused_moe_reference  # noqa: E402
from expertyard.quant import ExpertLayout, dequantize_expert, fused_moe_quantized, new_pool, pack_expert  # noqa: E402
from expertyard.quant.triton_ffn import fused_moe_quantized_triton, get_config  # noqa: E402

# T = tokens, S = pool slots, K = top-k, D = hidden, I = expert intermediate, G = group size

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}  # relative Frobenius error to the reference


def make_pool(s, d, i, bits, group, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    layout = ExpertLayout.build(d, i, bits, group)
    pool = new_pool(s, layout, "cuda")
    for e in range(s):
        gate = torch.randn(i, d, generator=g, device="cuda") / d**0.5  # [I, D]
        up = torch.randn(i, d, generator=g, device="cuda") / d**0.5  # [I, D]
        down = torch.randn(d, i, generator=g, device="cuda") / i**0.5  # [D, I]
        pack_expert(gate, up, down, bits, group, out=pool[e])
    return pool, layout


def make_routing(t, s, k, d, dtype, seed=0, holes=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, d, generator=g, device="cuda").to(dtype)  # [T, D]
    ids = torch.rand(t, s, generator=g, device="cuda").argsort(dim=1)[:, :k]  # [T, K] distinct slots
    if holes:
        ids[::3, 0] = -1  # not resident: skipped
    topk_w = torch.rand(t, k, generator=g, device="cuda").softmax(dim=-1)  # [T, K] float32
    return x, ids, topk_w


def reference(x, pool, layout, ids, topk_w):
    """Dequantize the used slots to float32, then the naive fused-MoE loop in float32."""
    used = sorted(set(ids[ids >= 0].tolist()))
    w13 = torch.zeros(pool.shape[0], 2 * layout.inter, layout.hidden, device="cuda")  # [S, 2I, D]
    w2 = torch.zeros(pool.shape[0], layout.hidden, layout.inter, device="cuda")  # [S, D, I]
    for s in used:
        w13[s], w2[s] = dequantize_expert(pool[s], layout)
    return fused_moe_reference(x.float(), w13, w2, ids.clamp(min=0), topk_w * (ids >= 0))


def check(y, ref, dtype):
    assert y.dtype == dtype and torch.isfinite(y).all()
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("t", [1, 33])
def test_half_precision_activations(t, bits, dtype):
    pool, layout = make_pool(6, 256, 384, bits, 64, seed=bits)
    x, ids, topk_w = make_routing(t, 6, 2, 256, dtype, seed=t)
    check(fused_moe_quantized(x, pool, layout, ids, topk_w), reference(x, pool, layout, ids, topk_w), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("t", [1, 33])
def test_inline_ptx_and_plain_code_paths(t, bits, dtype):
    """The code-to-float variants of get_config (inline PTX, mantissa OR, int-to-float) agree with the reference."""
    pool, layout = make_pool(6, 256, 384, bits, 64, seed=bits + 10)
    x, ids, topk_w = make_routing(t, 6, 2, 256, dtype, seed=t + 20)
    ref = reference(x, pool, layout, ids, topk_w)
    base = get_config(t * 2, 6, 256, 384, bits, 64)
    for variant in (dict(ASM=True), dict(ASM=False), dict(ASM=False, MAGIC=False)):
        check(fused_moe_quantized_triton(x, pool, layout, ids, topk_w, config={**base, **variant}), ref, dtype)


@pytest.mark.parametrize("bits", [4, 2])
def test_cuda_graph_replay(bits):
    pool, layout = make_pool(16, 2048, 768, bits, 64, seed=5)
    x, ids, topk_w = make_routing(4, 16, 8, 2048, torch.bfloat16, seed=6)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton compiles here, never during capture
        fused_moe_quantized(x, pool, layout, ids, topk_w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe_quantized(x, pool, layout, ids, topk_w)
    for seed in (7, 8):  # new tokens, routing and slot contents, same buffers
        x2, ids2, w2 = make_routing(4, 16, 8, 2048, torch.bfloat16, seed=seed)
        x.copy_(x2), ids.copy_(ids2), topk_w.copy_(w2)
        pool[ids2[0, 1]].copy_(make_pool(1, 2048, 768, bits, 64, seed=seed)[0][0])  # a miss filled a slot
        graph.replay()
        check(y, reference(x, pool, layout, ids, topk_w), torch.bfloat16)


def test_out_of_range_slots_are_dropped_and_strided_x():
    pool, layout = make_pool(5, 256, 128, 4, 64, seed=3)
    x, ids, topk_w = make_routing(20, 5, 2, 256, torch.bfloat16, seed=4)
    ids = ids.to(torch.int32)
    ids[1::4, 1] = 5  # >= S: dropped like -1
    keep = (ids >= 0) & (ids < 5)
    wide = torch.randn(20, 300, device="cuda", dtype=torch.bfloat16)[:, 20:276]  # [T, D], row stride 300
    wide.copy_(x)
    ref = reference(x, pool, layout, torch.where(keep, ids, -1), topk_w)
    check(fused_moe_quantized(wide, pool, layout, ids, topk_w), ref, torch.bfloat16)


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 128)])
@pytest.mark.parametrize("t", [1, 64])
def test_mixtral_shape(t, bits, group):
    pool, layout = make_pool(4, 4096, 14336, bits, group, seed=1)  # 4 slots of Mixtral-8x7B experts
    x, ids, topk_w = make_routing(t, 4, 2, 4096, torch.float32, seed=t)
    check(fused_moe_quantized(x, pool, layout, ids, topk_w), reference(x, pool, layout, ids, topk_w), torch.float32)


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 64), (4, 128), (2, 128)])
@pytest.mark.parametrize("t", [1, 4, 33, 64])
def test_qwen3_shape(t, bits, group):
    pool, layout = make_pool(16, 2048, 768, bits, group, seed=2)  # 16 slots of Qwen3-30B-A3B experts, top-8
    x, ids, topk_w = make_routing(t, 16, 8, 2048, torch.float32, seed=t)
    check(fused_moe_quantized(x, pool, layout, ids, topk_w), reference(x, pool, layout, ids, topk_w), torch.float32)


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 64), (8, 64), (4, 128), (2, 128)])
@pytest.mark.parametrize("t", [1, 4, 33, 64])
def test_float32_small_shape(t, bits, group):
    pool, layout = make_pool(6, 256, 384, bits, group, seed=bits)
    x, ids, topk_w = make_routing(t, 6, 2, 256, torch.float32, seed=t)
    check(fused_moe_quantized(x, pool, layout, ids, topk_w), reference(x, pool, layout, ids, topk_w), torch.float32)
