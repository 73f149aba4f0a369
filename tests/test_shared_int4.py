"""int4 on both pipes: the device cache holds int4 copies converted from the very buffers the host CPU computes
misses from. The conversion against the CPU kernel's own dequantization; generation (the CPU standing in for the
device) against a resident model whose experts are the dequantized int4 copies, with hits, copies and CPU
visits all taking place; the budget plans int4 slots; the flags that combine and those that do not."""

import pytest
import torch

from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.common import bundled_model_path
from expertyard.errors import ConfigError
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.cpu import CpuExpertCompute, CpuExpertStore
from expertyard.experts.cpu.weights import HAS_INT4_KERNEL, int4_block_rows
from expertyard.experts.host_store import HostExpertStore
from expertyard.experts.offload.backend import OffloadedExperts
from expertyard.experts.offload.build import build_offloaded_experts, plan_budget
from expertyard.experts.offload.config import OffloadConfig
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.offload.hybrid import HybridExecutor
from expertyard.experts.offload.shared_int4 import CpuInt4Source, SharedInt4Pool, shared_layout
from expertyard.experts.offload.transfer import TransferEngine
from expertyard.experts.policies import make_policy
from expertyard.loader import load_model
from expertyard.quant.packed_expert import dequantize_expert

from test_hybrid_offload import _costs, dequantized_resident_tokens_and_logprobs
from test_offload import _engine, _prompts

pytestmark = pytest.mark.skipif(not HAS_INT4_KERNEL or int4_block_rows(64) is None,
                                reason="this torch has no int4 CPU kernel with a known layout")


def _store(hidden=256, inter=128, experts=3, group=64, dtype=torch.float32):
    keys = [(0, e) for e in range(experts)]
    host = HostExpertStore(keys, hidden, inter, dtype, None, False)
    g = torch.Generator().manual_seed(0)
    for key in keys:
        for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            host.put(key, proj, torch.randn(shape, generator=g) * 0.05)
    return CpuExpertStore(host, keys, {"full", "int4"}, group, progress=False, int4_buffers=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_copy_dequantizes_to_what_the_cpu_kernel_computes_with(dtype):
    store = _store(dtype=dtype)
    source = CpuInt4Source(store)
    for key in store.keys:
        out = torch.zeros(source.layout.nbytes, dtype=torch.uint8)
        source.convert(store.int4_buffer(key), out)
        w13, w2 = dequantize_expert(out, source.layout, torch.float32)
        expert = store.get(key, "int4")
        for got, m in ((w13, expert.w13), (w2, expert.w2)):
            # the matrix torch's int4 CPU kernel multiplies by: its product with the identity, W.T [K, N]
            ref = m.matmul(torch.eye(got.shape[1], dtype=dtype)).float().T
            # float16 scale and minimum against the CPU's scale and zero (and bfloat16 rounding of the product)
            torch.testing.assert_close(got, ref, atol=8e-3 * ref.abs().max().item(), rtol=0)
        x = torch.randn(4, store.hidden, dtype=dtype)
        y_cpu = expert.forward(x).float()  # torch's int4 CPU kernel
        h = x.float() @ w13.T
        y_dev = (torch.nn.functional.silu(h[:, :store.inter]) * h[:, store.inter:]) @ w2.T
        torch.testing.assert_close(y_cpu, y_dev, atol=0.05 * y_dev.abs().max().item(), rtol=0)


def test_unknown_shapes_are_refused_by_name():
    with pytest.raises(ConfigError, match="96 input columns a multiple of --group-size 64"):
        shared_layout(256, 96, 64)


def shared_engine(device, dtype, slots, mode="auto", cpu_ms=1.0, copy_ms=1.0, group=128, graphs=False):
    loaded = load_model(bundled_model_path(), device, dtype, progress=False,
                        backend_factory=HostLoadedExperts.factory(None))
    host = loaded.model.experts
    store = CpuExpertStore(host.store, host.keys, {"full", "int4"}, group, progress=False, int4_buffers=True,
                           pin=device == "cuda")
    source = CpuInt4Source(store)
    pool = SharedInt4Pool(loaded.config, ExpertCacheState(slots, make_policy("lru")), source, host.device, dtype)
    hybrid = HybridExecutor(CpuExpertCompute(store), _costs(cpu_ms, copy_ms, source.expert_bytes), mode, "int4",
                            host.device, dtype, learn=False, copy_bytes=source.expert_bytes)
    loaded.model.set_expert_backend(OffloadedExperts(loaded.config, host, pool, TransferEngine(host.device),
                                                     precision_mode="low", hybrid=hybrid))
    return _engine(loaded, graphs=graphs)


def check_both_pipes(device: str, tol: float, graphs: bool = False) -> None:
    """float32: the greedy tokens and logprobs of the model whose experts are their int4 copies dequantized, with
    misses split between the link (int4 copies into the device pool) and the CPU, and hits on copied experts."""
    path = bundled_model_path()
    ref_tokens, ref_logp = dequantized_resident_tokens_and_logprobs(path, device, torch.float32, "int4")
    engine = shared_engine(device, torch.float32, slots=24, graphs=graphs)  # 4 layers x 16 experts, top-4
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref_tokens
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref_logp), atol=tol, rtol=tol)
    r = engine.model.experts.report(tokens=36)
    assert r["cpu_experts_per_token"] > 0 and r["copied_misses_per_token"] > 0 and r["hits"] > 0
    link_bytes = engine.model.experts.pool.link_bytes  # the int4 bytes cross the link, a quarter of float32's
    assert r["bytes_copied"] % link_bytes == 0 and r["bytes_copied"] >= link_bytes * r["copied_misses_per_token"] * 36


def test_both_pipes_equal_the_dequantized_model():
    check_both_pipes("cpu", 2e-3)


def test_budget_plans_int4_slots_and_the_engine_builds_them():
    """The same budget holds about four times as many int4 slots as full-precision ones; the engine builds the
    shared pool and the CPU computes from it."""
    loaded = load_model(bundled_model_path(), "cpu", torch.bfloat16, progress=False,
                        backend_factory=HostLoadedExperts.factory(None))
    full = OffloadConfig(gpu_memory_budget=600 * 2**20)
    shared = OffloadConfig(gpu_memory_budget=600 * 2**20, precision="low", low_precision_bits=4, cpu_precision="int4")
    args = (loaded.model, 2**20, 64, 64, torch.bfloat16, torch.device("cpu"))
    p_full, p_shared = plan_budget(args[0], full, *args[1:]), plan_budget(args[0], shared, *args[1:])
    assert p_shared.expert_bytes < p_full.expert_bytes / 3
    assert p_shared.slots >= min(p_shared.total_experts, 3 * p_full.slots)
    backend = build_offloaded_experts(loaded.model, shared, p_shared, None)
    assert isinstance(backend.pool, SharedInt4Pool) and backend.hybrid.precision == "int4"
    assert backend.hybrid.copy_bytes == backend.pool.link_bytes < loaded.config.expert_bytes(2) / 3


def test_flags_that_do_not_combine_say_what_to_use():
    assert OffloadConfig(expert_cache_fraction=0.5, precision="low", low_precision_bits=4,
                         cpu_precision="int4").shares_int4_copies
    assert not OffloadConfig(expert_cache_fraction=0.5, precision="low", low_precision_bits=4).shares_int4_copies
    assert not OffloadConfig(expert_cache_fraction=0.5, precision="low", low_precision_bits=4, cpu_compute="off",
                             ).shares_int4_copies
    with pytest.raises(ConfigError, match="add --precision low"):
        OffloadConfig(expert_cache_fraction=0.5, low_precision_bits=4, cpu_precision="int4")
    with pytest.raises(ConfigError, match="use --low-precision int4, not int8"):
        OffloadConfig(expert_cache_fraction=0.5, precision="low", low_precision_bits=8, cpu_precision="int4")
    with pytest.raises(ConfigError, match="use --cpu-precision int4"):
        OffloadConfig(expert_cache_fraction=0.5, precision="low", low_precision_bits=4, cpu_precision="int8")
    with pytest.raises(ConfigError, match="add --cpu-precision int4"):
        OffloadConfig(expert_cache_fraction=0.5, precision="low", low_precision_bits=4, cpu_compute="on")



# (hidden, inter, group, CPU row block, CPU dtype) for the device conversion against the torch one
CONVERT_CASES = [(256, 128, 64, 64, torch.bfloat16), (128, 96, 32, 32, torch.float16), (64, 48, 16, 16, torch.bfloat16),
                 (128, 64, 64, 0, torch.bfloat16), (256, 256, 128, 64, torch.float32)]


def check_kernel_conversion(device: str) -> int:
    """Random bytes as the CPU's packed codes and random (scale, zero): the Triton conversion writes the same bytes
    as the torch operations. Returns the cases checked."""
    from expertyard.experts.offload.shared_int4 import convert_cpu_int4

    for d, i, g, block, dtype in CONVERT_CASES:
        layout = shared_layout(d, i, g)
        gen = torch.Generator().manual_seed(d + i)
        parts = []
        for n, k in ((2 * i, d), (d, i)):
            parts.append(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen))
            parts.append((torch.randn(k // g, n, 2, generator=gen) * 0.1).to(dtype).view(torch.uint8).flatten())
        src = torch.cat(parts).to(device)
        want, got = (torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8, device=device) for _ in range(2))
        convert_cpu_int4(src, want, layout, block, dtype, kernels=False)
        convert_cpu_int4(src, got, layout, block, dtype, kernels=True)
        assert torch.equal(got, want), (d, i, g, block, dtype)
    return len(CONVERT_CASES)


def test_conversion_kernels_under_the_interpreter():
    """The Triton conversion's logic on the CPU (TRITON_INTERPRET=1); compiled in tests/gpu/test_hybrid_cuda.py."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests), os.environ.get("PYTHONPATH", "")])}
    script = "from test_shared_int4 import check_kernel_conversion\nprint(check_kernel_conversion('cpu'))"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == str(len(CONVERT_CASES))
