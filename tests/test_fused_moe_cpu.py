"""fused_moe on CPU tensors (the vectorised torch path) against the naive per-(token, k) reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertyard.kernels.fused_moe import fused_moe, fused_moe_reference, fused_moe_torch

# T = tokens, E = experts, K = top-k, D = hidden, I = expert intermediate

D, I = 32, 24


def make_inputs(t, e, k, d, i, dtype, routing, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=torch.float64).to(dtype)  # [T, D]
    w13 = (torch.randn(e, 2 * i, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype)  # [E, 2I, D]
    w2 = (torch.randn(e, d, i, generator=g, dtype=torch.float64) / i**0.5).to(dtype)  # [E, D, I]
    if routing == "distinct":  # k different experts per token, as a softmax top-k router gives
        ids = torch.rand(t, e, generator=g).argsort(dim=1)[:, :k]
    elif routing == "skewed":  # every token on experts 0 and 1: the other experts get no tokens
        ids = torch.rand(t, 2, generator=g).argsort(dim=1)[:, :k]
    elif routing == "duplicates":  # one expert may appear twice in a token
        ids = torch.randint(0, 2, (t, k), generator=g)
    else:
        raise ValueError(routing)
    topk_w = torch.rand(t, k, generator=g, dtype=torch.float64).softmax(dim=-1).to(torch.float32)  # [T, K]
    return x, w13, w2, ids, topk_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("routing", ["distinct", "skewed", "duplicates"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("e", [4, 8])
@pytest.mark.parametrize("t", [1, 3, 17])
def test_torch_path_matches_reference(t, e, k, routing, dtype):
    x, w13, w2, ids, topk_w = make_inputs(t, e, k, D, I, dtype, routing, seed=t * 100 + e * 10 + k)
    y = fused_moe(x, w13, w2, ids, topk_w)
    ref = fused_moe_reference(x, w13, w2, ids, topk_w)
    assert y.dtype == dtype and y.shape == (t, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_int32_ids_low_precision_weights_and_bf16_x():
    x, w13, w2, ids, topk_w = make_inputs(9, 8, 2, D, I, torch.bfloat16, "distinct", seed=7)
    y = fused_moe(x, w13, w2, ids.int(), topk_w.bfloat16())
    ref = fused_moe_reference(x, w13, w2, ids, topk_w.bfloat16())  # float32 math on the same bf16 inputs
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_torch_path_direct_and_zero_tokens():
    x, w13, w2, ids, topk_w = make_inputs(5, 4, 2, D, I, torch.float32, "distinct")
    torch.testing.assert_close(fused_moe_torch(x, w13, w2, ids, topk_w), fused_moe_reference(x, w13, w2, ids, topk_w),
                               rtol=1e-5, atol=1e-5)
    y = fused_moe(x[:0], w13, w2, ids[:0], topk_w[:0])
    assert y.shape == (0, D)


def test_errors_name_the_problem():
    x, w13, w2, ids, topk_w = make_inputs(3, 4, 2, D, I, torch.float32, "distinct")
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, w2[:, :, :-1], ids, topk_w)
    with pytest.raises(ValueError, match="topk_ids and topk_w"):
        fused_moe(x, w13, w2, ids[:, :1], topk_w)
    with pytest.raises(TypeError, match="int32 or int64"):
        fused_moe(x, w13, w2, ids.float(), topk_w)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        fused_moe(x, w13, w2, ids + 3, topk_w)


def test_import_does_not_need_triton():
    import expertyard

    src = str(Path(expertyard.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, expertyard.kernels; assert 'triton' not in sys.modules, 'importing kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
