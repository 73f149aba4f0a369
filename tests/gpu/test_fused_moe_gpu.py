"""The Triton fused_moe against the naive float32 reference, eagerly and after a CUDA-graph replay."""

import pytest
import torch

from expertyard.kernels.fused_moe import fused_moe, fused_moe_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# T = tokens, E = experts, K = top-k, D = hidden, I = expert intermediate

TOL = {  # (rtol, atol relative to max|ref|, max relative Frobenius error)
    torch.bfloat16: (2e-2, 1e-2, 1e-2),
    torch.float16: (1e-2, 3e-3, 3e-3),
    torch.float32: (1e-4, 1e-5, 1e-5),
}


def make_inputs(t, e, k, d, i, dtype, seed=0, id_dtype=torch.int64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, d, generator=g, device="cuda").to(dtype)  # [T, D]
    w13 = (torch.randn(e, 2 * i, d, generator=g, device="cuda") / d**0.5).to(dtype)  # [E, 2I, D]
    w2 = (torch.randn(e, d, i, generator=g, device="cuda") / i**0.5).to(dtype)  # [E, D, I]
    ids = torch.rand(t, e, generator=g, device="cuda").argsort(dim=1)[:, :k].to(id_dtype)  # [T, K] distinct
    topk_w = torch.rand(t, k, generator=g, device="cuda").softmax(dim=-1)  # [T, K] float32
    return x, w13, w2, ids, topk_w


def check(y, ref, dtype):
    rtol, atol, frob = TOL[dtype]
    assert y.dtype == dtype and torch.isfinite(y).all()
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < frob, f"relative error {err:.2e} >= {frob:.0e}"
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=atol * ref.abs().max().item())


def reference(x, w13, w2, ids, topk_w):
    return fused_moe_reference(x.float(), w13.float(), w2.float(), ids, topk_w)  # float32 math, same inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,i", [(256, 128), (320, 200)])
@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("e", [8, 64])
@pytest.mark.parametrize("t", [1, 2, 7, 32, 64, 300])
def test_matches_reference(t, e, k, d, i, dtype):
    x, w13, w2, ids, topk_w = make_inputs(t, e, k, d, i, dtype, seed=t + 1000 * k + 7 * e)
    check(fused_moe(x, w13, w2, ids, topk_w), reference(x, w13, w2, ids, topk_w), dtype)


@pytest.mark.parametrize("d,i", [(256, 128), (320, 200)])
@pytest.mark.parametrize("t", [1, 7, 300, 700])  # 700: the largest block-size bucket
def test_float32(t, d, i):
    x, w13, w2, ids, topk_w = make_inputs(t, 8, 2, d, i, torch.float32, seed=t)
    check(fused_moe(x, w13, w2, ids, topk_w), reference(x, w13, w2, ids, topk_w), torch.float32)


def test_int32_ids_bf16_weights_strided_x_and_skewed_routing():
    x, w13, w2, ids, topk_w = make_inputs(50, 16, 4, 320, 200, torch.bfloat16, seed=3, id_dtype=torch.int32)
    ids[:40] = torch.tensor([0, 1, 2, 3], device="cuda", dtype=torch.int32)  # 40 tokens on 4 experts, 12 unused
    x_strided = torch.randn(50, 400, device="cuda", dtype=torch.bfloat16)[:, 40:360]  # [T, D], row stride 400
    x_strided.copy_(x)
    w = topk_w.bfloat16()
    check(fused_moe(x_strided, w13, w2, ids, w), reference(x, w13, w2, ids, w), torch.bfloat16)


def test_out_of_range_ids_are_dropped():
    x, w13, w2, ids, topk_w = make_inputs(20, 8, 2, 256, 128, torch.bfloat16, seed=5)
    ids[::3, 1] = -1
    ids[1::3, 0] = 8
    keep = (ids >= 0) & (ids < 8)
    ref = reference(x, w13, w2, ids.clamp(0, 7), topk_w * keep)
    check(fused_moe(x, w13, w2, ids, topk_w), ref, torch.bfloat16)


@pytest.mark.parametrize("t", [1, 32])
def test_mixtral_shape(t):
    x, w13, w2, ids, topk_w = make_inputs(t, 8, 2, 4096, 14336, torch.bfloat16, seed=11)
    y = fused_moe(x, w13, w2, ids, topk_w)
    ref = fused_moe_reference(x.float(), w13, w2, ids, topk_w)  # upcasts one expert at a time
    check(y, ref, torch.bfloat16)


def test_no_host_sync():
    x, w13, w2, ids, topk_w = make_inputs(64, 64, 6, 256, 128, torch.bfloat16)
    fused_moe(x, w13, w2, ids, topk_w)  # warm-up: compiles
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, w13, w2, ids, topk_w)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (7, 64, 6), (64, 8, 2), (300, 64, 6)])
def test_cuda_graph_replay_with_new_routing(t, e, k):
    d, i, dtype = 320, 200, torch.bfloat16
    x, w13, w2, ids, topk_w = make_inputs(t, e, k, d, i, dtype, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as torch.cuda.graphs advises
        for _ in range(2):
            fused_moe(x, w13, w2, ids, topk_w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, w13, w2, ids, topk_w)
    for seed in range(2, 5):
        x2, _, _, ids2, w_new = make_inputs(t, e, k, d, i, dtype, seed=seed)
        x.copy_(x2)
        ids.copy_(ids2)
        topk_w.copy_(w_new)
        y.fill_(float("nan"))  # poison: the replay must write every element
        graph.replay()
        torch.cuda.synchronize()
        check(y, reference(x, w13, w2, ids, topk_w), dtype)
