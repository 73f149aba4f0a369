"""CPU expert compute: layouts against float64 references, the store, the worker, threads and the cost figures.

Tolerances (max |error| / max |reference| over the output):
- float32 layouts vs float64 math on the same weights: 1e-5 (float32 accumulation).
- bfloat16 layouts vs float64 math on the same bf16 weights and bf16-rounded input: 3e-2 (the hidden activation
  [T, 2I] and silu(gate) * up are rounded to bfloat16 before the down projection, ~2^-8 relative each, and
  torch's bf16 kernels may round partial sums).
- int8 / int4 kernels vs float64 math on their own dequantized weights: the same bounds (this checks packing and
  kernel); vs the original weights: loose, a sanity bound on quantization error (int8 5e-2, int4 0.35).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from expertyard.errors import ConfigError
from expertyard.experts.cpu import store as store_mod
from expertyard.experts.cpu import threads as threads_mod
from expertyard.experts.cpu import weights as weights_mod
from expertyard.experts.cpu.compute import CpuExpertCompute
from expertyard.experts.cpu.costs import HybridCosts, fit_linear, measure_costs
from expertyard.experts.cpu.store import CpuExpertStore, available_memory_bytes, parse_precisions
from expertyard.experts.cpu.threads import logical_cpus, physical_cores, set_cpu_threads
from expertyard.experts.cpu.weights import (FullCpuExpert, Int4CpuExpert, Int8CpuExpert, check_group_size,
                                            default_group_size, int4_grid, int4_nbytes, int8_grid, int8_nbytes,
                                            quantize_for_cpu)
from expertyard.experts.host_store import HostExpertStore

# T = tokens, D = hidden size, I = expert intermediate size

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
SHAPES = [(64, 48), (128, 256)]  # (D, I): the first needs padding (I is no multiple of 32), the second none


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the test host's 2 cores are shared, and OpenMP threads waiting on a descheduled
    sibling turn microseconds into milliseconds. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _expert(d, i, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(2 * i, d, generator=g, dtype=torch.float64) * 0.05).to(dtype)  # [2I, D]
    w2 = (torch.randn(d, i, generator=g, dtype=torch.float64) * 0.05).to(dtype)  # [D, I]
    return w13, w2


def _reference(x, w13, w2):
    """float64 down(silu(gate x) * up x) by plain matmuls, x [T, D] -> [T, D]."""
    i = w2.shape[1]
    h = x.double() @ w13.double().T  # [T, 2I]
    return (F.silu(h[:, :i]) * h[:, i:]) @ w2.double().T  # [T, D]


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


# ---- layouts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,i", SHAPES)
def test_full_layout_matches_float64(dtype, d, i):
    w13, w2 = _expert(d, i, dtype)
    buf = torch.cat([w13.reshape(-1), w2.reshape(-1)])  # a host-store row: [gate | up | down]
    e = FullCpuExpert.from_flat(buf, d, i)
    assert e.w13.data_ptr() == buf.data_ptr()  # views, no copy
    assert e.nbytes == buf.numel() * buf.element_size()
    x = torch.randn(7, d)
    y = e.forward(x)
    assert y.shape == (7, d) and y.dtype == dtype
    assert _rel(y, _reference(x.to(dtype), w13, w2)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,i", SHAPES)
def test_int8_kernel_matches_its_dequantized_weights(dtype, d, i):
    w13, w2 = _expert(d, i, dtype, seed=1)
    e = quantize_for_cpu(w13, w2, 8)
    assert isinstance(e, Int8CpuExpert) and e.nbytes == int8_nbytes(d, i, dtype)
    d13, d2 = e.dequantize()
    for w, dq in ((w13, d13), (w2, d2)):  # round to nearest: within half a step of every weight
        step = w.float().abs().amax(dim=1, keepdim=True) / 127 * (1 + 2 ** -7)
        assert ((dq - w.float()).abs() <= step / 2 * 1.01 + 1e-12).all()
    for t in (1, 5, 33):
        x = torch.randn(t, d)
        y = e.forward(x)
        assert y.shape == (t, d) and y.dtype == dtype
        assert _rel(y, _reference(x.to(dtype), d13, d2)) < TOL[dtype]
        assert _rel(y, _reference(x.to(dtype), w13, w2)) < 5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,i,group", [(64, 48, None), (128, 256, None), (128, 256, 64), (256, 128, 32)])
def test_int4_kernel_matches_its_dequantized_weights(dtype, d, i, group):
    w13, w2 = _expert(d, i, dtype, seed=2)
    e = quantize_for_cpu(w13, w2, 4, group)
    g = group or default_group_size(d, i)
    assert isinstance(e, Int4CpuExpert) and e.group_size == g and e.nbytes == int4_nbytes(d, i, g, dtype)
    g13, g2 = int4_grid(w13, g, dtype), int4_grid(w2, g, dtype)
    d13, d2 = g13.dequantize(), g2.dequantize()
    for w, grid, dq in ((w13, g13, d13), (w2, g2, d2)):  # within half a step (plus the zero's rounding)
        n, k = w.shape
        step = grid.scale.float().repeat_interleave(g, dim=1)[:n, :k]
        slack = grid.zero.float().abs().repeat_interleave(g, dim=1)[:n, :k] * 2 ** -7
        assert ((dq - w.float()).abs() <= step / 2 + slack + 1e-7).all()
    for t in (1, 4, 17):
        x = torch.randn(t, d)
        y = e.forward(x)
        assert y.shape == (t, d) and y.dtype == dtype
        assert _rel(y, _reference(x.to(dtype), d13, d2)) < TOL[dtype]
        assert _rel(y, _reference(x.to(dtype), w13, w2)) < 0.35


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_then_matmul_fallback_gives_the_kernels_numbers(bits, monkeypatch):
    """Where torch lacks a low-bit CPU kernel the layout dequantizes per call: same result."""
    w13, w2 = _expert(64, 48, torch.float32, seed=3)
    x = torch.randn(5, 64)
    with_kernel = quantize_for_cpu(w13, w2, bits).forward(x)
    monkeypatch.setattr(weights_mod, "HAS_INT8_KERNEL", False)
    monkeypatch.setattr(weights_mod, "HAS_INT4_KERNEL", False)
    fallback = quantize_for_cpu(w13, w2, bits)
    assert fallback.nbytes == (int8_nbytes(64, 48, torch.float32) if bits == 8 else
                               int4_nbytes(64, 48, 32, torch.float32))
    torch.testing.assert_close(fallback.forward(x), with_kernel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_leaves_the_weights_untouched(bits):
    """The host store's float32 buffers are quantized in place-free copies (the CPU also computes from them)."""
    w13, w2 = _expert(64, 128, torch.float32, seed=4)
    before = (w13.clone(), w2.clone())
    quantize_for_cpu(w13, w2, bits)
    assert torch.equal(w13, before[0]) and torch.equal(w2, before[1])


def test_group_size_choice_and_errors():
    assert default_group_size(4096, 14336) == 128  # Mixtral-8x7B
    assert default_group_size(2048, 1408) == 128  # DeepSeek-V2-Lite
    assert default_group_size(2048, 96) == 32
    assert default_group_size(64, 48) == 32  # nothing divides I=48: padded
    assert check_group_size(64, 4096, 14336) == 64
    with pytest.raises(ConfigError, match=r"group size 48 .* 32, 64, 128, 256"):
        check_group_size(48, 64, 48)
    w13, w2 = _expert(64, 48, torch.float32)
    with pytest.raises(ConfigError, match="8 or 4 bits, not 2"):
        quantize_for_cpu(w13, w2, 2)
    with pytest.raises(ConfigError, match="do not match"):
        quantize_for_cpu(w13, w2.T, 8)


# ---- store --------------------------------------------------------------------------------------------------

def _host(keys, d, i, dtype, seed=0):
    h = HostExpertStore(keys, d, i, dtype, host_budget_bytes=None, pin=False)
    for n, key in enumerate(keys):
        w13, w2 = _expert(d, i, dtype, seed=seed + n)
        h.put(key, "gate", w13[:i])
        h.put(key, "up", w13[i:])
        h.put(key, "down", w2)
    return h


KEYS = [(0, 0), (0, 1), (1, 0), (1, 3)]


def test_store_builds_every_precision_and_full_reads_the_host_buffer():
    d, i = 64, 128
    h = _host(KEYS, d, i, torch.bfloat16)
    s = CpuExpertStore(h, KEYS, {"full", "int8", "int4"}, progress=False)
    assert s.nbytes("full") == h.expert_bytes
    assert s.nbytes("int8") == s.get(KEYS[0], "int8").nbytes and s.nbytes("int4") == s.get(KEYS[0], "int4").nbytes
    assert s.nbytes("int4") < s.nbytes("int8") < s.nbytes("full")
    assert s.memory_bytes == len(KEYS) * (s.nbytes("int8") + s.nbytes("int4"))
    full = s.get(KEYS[2], "full")
    assert full.w13.data_ptr() == h.source(KEYS[2], torch.device("cpu")).data_ptr()
    x = torch.randn(3, d)
    w13, w2 = _expert(d, i, torch.bfloat16, seed=2)  # KEYS[2]'s weights
    for p in ("full", "int8", "int4"):
        assert _rel(s.get(KEYS[2], p).forward(x), _reference(x.bfloat16(), w13, w2)) < (0.35 if p == "int4" else 5e-2)
    only4 = CpuExpertStore(h, KEYS, "int4", group_size=32, progress=False)
    assert only4.group_size == 32 and only4.in_memory(KEYS[0], "int4") and not only4.in_memory(KEYS[0], "int8")
    with pytest.raises(KeyError, match="int8"):
        only4.get(KEYS[0], "int8")


def test_store_reads_disk_tier_experts_from_their_files(tmp_path):
    d, i = 64, 64
    src = _host(KEYS, d, i, torch.float32)
    h = HostExpertStore(KEYS, d, i, torch.float32, host_budget_bytes=2 * src.expert_bytes, pin=False)
    tensors = {}
    for key in KEYS:
        for proj in ("gate", "up", "down"):
            tensors[f"{key[0]}.{key[1]}.{proj}"] = src.view(key, proj).clone()
    save_file(tensors, tmp_path / "experts.safetensors")
    for key in KEYS:
        for proj in ("gate", "up", "down"):
            if h.in_memory(key):
                h.put(key, proj, tensors[f"{key[0]}.{key[1]}.{proj}"])
            else:
                h.put_on_disk(key, proj, tmp_path / "experts.safetensors", f"{key[0]}.{key[1]}.{proj}")
    s = CpuExpertStore(h, KEYS, {"full", "int8"}, progress=False)
    on_disk = KEYS[3]
    assert not h.in_memory(on_disk) and not s.in_memory(on_disk, "full") and s.in_memory(on_disk, "int8")
    x = torch.randn(4, d)
    ref = _reference(x, *_expert(d, i, torch.float32, seed=3))
    assert _rel(s.get(on_disk, "full").forward(x), ref) < 1e-5
    assert _rel(s.get(on_disk, "int8").forward(x), ref) < 5e-2


def test_store_refuses_precisions_that_do_not_fit_in_ram(monkeypatch):
    h = _host(KEYS, 64, 64, torch.float32)
    monkeypatch.setattr(store_mod, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(ConfigError) as err:
        CpuExpertStore(h, KEYS, {"int8", "int4"}, progress=False)
    msg = str(err.value)
    assert f"only {100_000 / 2 ** 20:.1f} MiB is available" in msg and "MemAvailable" in msg
    assert "fewer CPU precisions" in msg and "--host-memory-budget" in msg and "disk" in msg
    assert f"int8: {len(KEYS) * int8_nbytes(64, 64, torch.float32) / 2 ** 20:.1f} MiB" in msg
    assert f"int4: {len(KEYS) * int4_nbytes(64, 64, 64, torch.float32) / 2 ** 20:.1f} MiB" in msg
    CpuExpertStore(h, KEYS, {"full"}, progress=False)  # full precision needs no copy: no check, no error


def test_available_memory_and_precision_parsing():
    avail = available_memory_bytes()
    assert avail is None or avail > 0
    assert parse_precisions("full, int4") == {"full", "int4"}
    assert parse_precisions(["INT8"]) == {"int8"}
    with pytest.raises(ConfigError, match="int3"):
        parse_precisions("full,int3")
    with pytest.raises(ConfigError, match="none"):
        parse_precisions([])


# ---- compute ------------------------------------------------------------------------------------------------

def test_compute_sums_gate_weighted_experts_like_a_per_token_loop():
    d, i = 64, 128
    h = _host(KEYS, d, i, torch.bfloat16)
    s = CpuExpertStore(h, KEYS, {"full", "int8", "int4"}, progress=False)
    comp = CpuExpertCompute(s)
    t = 6
    x = torch.randn(t, d)  # float32 input into a bf16 store: converted once
    g = torch.Generator().manual_seed(5)
    items = [(KEYS[0], "full", torch.tensor([0, 2, 5]), torch.rand(3, generator=g)),
             (KEYS[1], "int8", torch.tensor([2, 3]), torch.rand(2, generator=g)),
             (KEYS[2], "int4", torch.tensor([5, 0, 1, 2]), torch.rand(4, generator=g)),
             (KEYS[3], "full", torch.tensor([], dtype=torch.long), torch.rand(0)),  # nothing routed
             (KEYS[0], "int4", torch.tensor([2]), torch.rand(1, generator=g))]  # token 2 in four items
    want = torch.zeros(t, d, dtype=torch.float64)
    for key, p, idx, w in items:
        for n, tok in enumerate(idx.tolist()):  # the naive loop: one token at a time
            want[tok] += float(w[n]) * s.get(key, p).forward(x[tok:tok + 1].bfloat16())[0].double()
    out = comp.run(x, items)
    assert out.shape == (t, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert out[4].abs().max() == 0  # no item routes token 4
    torch.testing.assert_close(comp.submit(x, items).result(), out)
    comp.close()


def test_compute_float32_matches_float64_reference_exactly_enough():
    d, i = 64, 64
    h = _host(KEYS, d, i, torch.float32)
    comp = CpuExpertCompute(CpuExpertStore(h, KEYS, {"full"}, progress=False))
    x = torch.randn(4, d, dtype=torch.float64).float()
    idx, w = torch.tensor([3, 1, 3]), torch.tensor([0.25, 0.5, 0.75])  # token 3 twice in one item
    out = comp.run(x, [(KEYS[1], "full", idx, w)])
    ref = _reference(x, *_expert(d, i, torch.float32, seed=1))  # KEYS[1]'s weights
    want = torch.zeros(4, d, dtype=torch.float64)
    want[1] = 0.5 * ref[1]
    want[3] = (0.25 + 0.75) * ref[3]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="CPU tensor"):
        comp.run(x.T.contiguous(), [])
    comp.close()


def test_submit_runs_on_one_worker_thread_with_the_set_thread_count():
    h = _host(KEYS[:1], 64, 64, torch.float32)
    comp = CpuExpertCompute(CpuExpertStore(h, KEYS[:1], {"full"}, progress=False))
    names = {comp._worker.submit(lambda: threading.current_thread().name).result() for _ in range(3)}
    assert len(names) == 1 and names != {threading.current_thread().name}
    assert comp._worker.submit(torch.get_num_threads).result() == torch.get_num_threads() == 1
    comp.close()


# ---- threads ------------------------------------------------------------------------------------------------

def test_set_cpu_threads_validates_and_sets():
    limit = logical_cpus()
    assert 1 <= physical_cores() <= limit
    for bad in (0, -1, limit + 1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=rf"--cpu-threads .* 1\.\.{limit}"):
            set_cpu_threads(bad)
    assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
    assert set_cpu_threads(None) == physical_cores() == torch.get_num_threads()


def test_physical_cores_counts_distinct_cores_of_the_allowed_cpus(tmp_path, monkeypatch):
    # 4 logical CPUs: two hyper-threads on each of 2 cores; the process may use CPUs 0, 1 and 2
    for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 1)):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(threads_mod, "_SYS_CPU", tmp_path)
    monkeypatch.setattr(threads_mod, "_CGROUP_CPU_MAX", tmp_path / "absent")
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert logical_cpus() == 3 and physical_cores() == 2
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # a cgroup quota of 2 CPUs
    monkeypatch.setattr(threads_mod, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert logical_cpus() == 2
    monkeypatch.setattr(threads_mod, "_SYS_CPU", tmp_path / "no-sysfs")  # then /proc/cpuinfo
    (tmp_path / "cpuinfo").write_text("".join(f"processor\t: {c}\nphysical id\t: 0\ncore id\t\t: {c // 2}\n\n"
                                              for c in range(4)))
    monkeypatch.setattr(threads_mod, "_CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(threads_mod, "_CGROUP_CPU_MAX", tmp_path / "absent")
    assert physical_cores() == 2
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert physical_cores() == 1  # two hyper-threads of one core
    monkeypatch.setattr(threads_mod, "_CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(threads_mod.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert physical_cores() == 4  # neither source: half the logical CPUs
    monkeypatch.setattr(threads_mod, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert physical_cores() == 2  # capped by the 2 CPUs the quota allows


# ---- costs --------------------------------------------------------------------------------------------------

def test_fit_linear_recovers_lines_and_never_decreases():
    a, b = fit_linear([1, 4, 16], [2.0 + 0.5 * t for t in (1, 4, 16)])
    assert a == pytest.approx(2.0) and b == pytest.approx(0.5)
    assert fit_linear([1, 4, 16], [3.0, 2.0, 1.0]) == (pytest.approx(2.0), 0.0)  # noise: flat mean
    a, b = fit_linear([1, 4, 16], [0.5, 3.9, 16.5])  # would cross below zero: through the origin
    assert a >= 0 and b > 0


def test_measured_costs_are_positive_monotone_and_round_trip():
    d, i = 64, 128
    h = _host(KEYS, d, i, torch.bfloat16)
    s = CpuExpertStore(h, KEYS, {"full", "int8", "int4"}, progress=False)
    c = measure_costs(s, torch.device("cpu"))
    assert set(c.cpu_fit) == {"full", "int8", "int4"} and c.threads == 1
    for p in ("full", "int8", "int4"):
        ts = [c.cpu_s(p, t) for t in (1, 2, 4, 16, 64)]
        assert all(t > 0 for t in ts) and ts == sorted(ts)
        assert c.cpu_s(p, 0) == 0.0
    assert 0 < c.gpu_s(1) <= c.gpu_s(8)
    assert c.pcie_bytes_per_s > 0 and c.copy_s(h.expert_bytes) == pytest.approx(h.expert_bytes / c.pcie_bytes_per_s)
    assert c.expert_bytes == {"full": s.nbytes("full"), "int8": s.nbytes("int8"), "int4": s.nbytes("int4")}
    text = c.describe()
    assert len(text.splitlines()) == 5 and "CPU int4" in text and "memcpy" in text
    back = HybridCosts.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    with pytest.raises(KeyError, match="int2"):
        c.cpu_s("int2", 1)


def test_fixed_costs_from_a_dict_and_their_validation():
    c = HybridCosts.from_dict({"pcie_bytes_per_s": 50e9, "cpu_fit": {"full": [5e-3, 1e-5], "int4": [2e-3, 2e-4]},
                               "gpu_fit": [1e-4, 0.0]})
    assert c.cpu_s("full", 1) == pytest.approx(5.01e-3) and c.cpu_s("int4", 16) == pytest.approx(5.2e-3)
    assert c.copy_s(352_321_536) == pytest.approx(352_321_536 / 50e9) and c.gpu_s(32) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="pcie_bytes_per_s=0"):
        HybridCosts(pcie_bytes_per_s=0, cpu_fit={}, gpu_fit=(1e-4, 0))
    with pytest.raises(ConfigError, match=r"cpu_fit\['int8'\]"):
        HybridCosts(pcie_bytes_per_s=1e9, cpu_fit={"int8": (-1.0, 0.0)}, gpu_fit=(1e-4, 0))
