"""Mixed-precision offloading (HOBBIT) in the backend: each pair computed from the copy the rule gives it, against
a naive float64 reference written from the rule's definition; the all-FULL and all-LOW corners against resident
models; quantized copies read from `expertyard quantize` files."""

import pytest
import torch
import torch.nn.functional as F

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.cli import main
from expertyard.errors import ConfigError
from expertyard.experts.offload.build import mixed_precision_backend
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.policies import make_policy
from expertyard.experts.precision import PrecisionThresholds
from expertyard.experts.predictors import NextGatePredictor
from expertyard.loader import load_model
from expertyard.quant.low_store import LowPrecisionStore
from expertyard.quant.packed_expert import dequantize_expert


def _offloaded(path, high_slots, low_slots, bits=4, mode="mixed", thresholds=None, depth=0, policy="lru",
               device="cpu", group_size=16, dtype=torch.float32):
    loaded = load_model(path, device, dtype, progress=False, backend_factory=HostLoadedExperts.factory())
    host = loaded.model.experts
    pred = NextGatePredictor(loaded.model, depth) if depth else None
    low = LowPrecisionStore.quantize(host.store, host.keys, bits, group_size, torch.device(device),
                                     pin=device != "cpu", progress=False)
    loaded.model.set_expert_backend(mixed_precision_backend(loaded.model, high_slots, low_slots, make_policy(policy),
                                                            make_policy(policy), low, mode, thresholds, pred))
    return loaded


def _naive_visit(backend, layer, x, ids, w, th):
    """y [T, D] float64 from the rule's definition, given residency *before* the visit."""
    d, i = backend.cfg.hidden_size, backend.cfg.moe.intermediate_size
    high = {e for (l, e) in backend.mixed.high.resident if l == layer}
    low = {e for (l, e) in backend.mixed.low.resident if l == layer}
    wn = w.double() / w.double().sum(-1, keepdim=True)
    y = torch.zeros(x.shape[0], d, dtype=torch.float64)
    lv = torch.zeros(ids.shape, dtype=torch.long)
    for t in range(ids.shape[0]):
        above = 0.0
        for k in sorted(range(ids.shape[1]), key=lambda k: -float(wn[t, k])):
            lv[t, k] = 0 if above <= th.full else 1 if above <= th.low else 2
            above += float(wn[t, k])
    need_full = {int(ids[t, k]) for t in range(ids.shape[0]) for k in range(ids.shape[1]) if lv[t, k] == 0}
    for t in range(ids.shape[0]):
        src = []
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in high or (e not in low and lv[t, k] != 2 and e in need_full):
                src.append("full")
            elif (e in low and lv[t, k] != 0) or lv[t, k] == 1:
                src.append("low")
            elif lv[t, k] == 2:
                src.append(None)
            else:
                src.append("full")  # FULL pair whose expert only has a low copy: a full load
        kept = sum(float(w[t, k]) for k in range(ids.shape[1]) if src[k])
        scale = float(w[t].double().sum()) / kept
        for k, s in enumerate(src):
            if s is None:
                continue
            e = int(ids[t, k])
            flat = backend.store.source((layer, e), torch.device("cpu")).double()
            if s == "full":
                w13 = flat[:2 * i * d].view(2 * i, d)
                w2 = flat[2 * i * d:].view(d, i)
            else:
                w13, w2 = dequantize_expert(backend.low.store.source((layer, e)), backend.low.layout, torch.float64)
            gu = x[t].double() @ w13.T
            h = F.silu(gu[:i]) * gu[i:]
            y[t] += float(w[t, k]) * scale * (h @ w2.T)
    return y


def check_pairs_against_naive_reference(loaded, device="cpu", tokens=1, atol=1e-5):
    backend, cfg = loaded.model.experts, loaded.config
    th = PrecisionThresholds(0.5, 0.8)  # tiny routers are flat: thresholds that reach every branch
    backend.thresholds = th
    g = torch.Generator().manual_seed(0)
    e, k = cfg.moe.num_experts, cfg.moe.top_k
    for step in range(24):
        layer = cfg.moe_layers[step % len(cfg.moe_layers)]
        x = torch.randn(tokens, cfg.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
        w = torch.rand(tokens, k, generator=g) ** 4 + 1e-3
        ref = _naive_visit(backend, layer, x, ids, w, th)
        y = backend.forward_routed(layer, x.to(device), ids.to(device), w.to(device), [])
        torch.testing.assert_close(y.double().cpu(), ref, atol=atol, rtol=1e-4)
    served = backend.pairs_served
    assert served["full"] and served["low"] and served["skipped"], served
    report = backend.report(tokens=24)
    assert report["expert_full_misses"] > 0 and report["expert_low_misses"] > 0
    assert report["bytes_copied"] == (backend.expert_bytes * report["expert_full_misses"]
                                      + backend.low.layout.nbytes * report["expert_low_misses"])


@pytest.mark.parametrize("arch,tokens", [("qwen3_moe", 1), ("mixtral", 1), ("qwen3_moe", 2)])
def test_each_pair_uses_the_copy_the_rule_gives_it(arch, tokens, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)  # top-k <= 3: pools of 3 x tokens + 1 hold a visit
    check_pairs_against_naive_reference(_offloaded(path, high_slots=3 * tokens, low_slots=3 * tokens + 2),
                                        tokens=tokens)


def test_all_full_thresholds_give_the_full_precision_tokens(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe")
    prompts = [[5, 9, 11, 3], [7, 7, 2]]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=1)
    ref = LLMEngine(load_model(path, "cpu", torch.float32, progress=False), None,
                    EngineConfig(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=1), eos_token_ids=set())
    ref_out = ref.generate(prompts, params)
    loaded = _offloaded(path, high_slots=5, low_slots=4, thresholds=PrecisionThresholds(1.0, 1.0), depth=1)
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=1),
                       eos_token_ids=set())
    out = engine.generate(prompts, params)
    assert [s.output_token_ids for s in out] == [s.output_token_ids for s in ref_out]
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in out]),
                               torch.tensor([[x["logprob"] for x in s.logprobs] for s in ref_out]), atol=1e-4, rtol=1e-4)
    assert loaded.model.experts.pairs_served["low"] == 0


def test_all_low_equals_a_resident_model_of_dequantized_experts(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe")
    loaded = _offloaded(path, high_slots=5, low_slots=4, bits=2, mode="low")
    backend = loaded.model.experts
    ref = load_model(path, "cpu", torch.float32, progress=False)
    for (layer, e) in backend.keys:  # the reference: resident experts replaced by their dequantized int2 copies
        w13, w2 = dequantize_expert(backend.low.store.source((layer, e)), backend.low.layout)
        ref.model.experts.w13[layer][e].copy_(w13)
        ref.model.experts.w2[layer][e].copy_(w2)
    cfg = EngineConfig(max_num_seqs=1, max_model_len=64, max_num_batched_tokens=1)
    ids = [5, 9, 11, 3, 8, 1, 2, 40, 17]
    ours = LLMEngine(loaded, None, cfg, eos_token_ids=set()).score(ids)
    theirs = LLMEngine(ref, None, cfg, eos_token_ids=set()).score(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert backend.pairs_served["full"] == 0 and backend.pairs_served["skipped"] == 0


def test_cli_mixed_precision_with_quantize_files(tmp_path, capsys):
    """`expertyard quantize` files are read instead of quantizing; a file for other shapes is refused; bad flags
    name the value."""
    from expertyard.entrypoints.common import bundled_model_path

    assert main(["quantize", "--bits", "4", "--out", str(tmp_path / "q"), "--json"]) == 0
    capsys.readouterr()
    args = ["generate", "--prompt", "Once upon a time", "--max-tokens", "8", "--offload", "--expert-cache-fraction",
            "0.5", "--predictor", "none", "--json"]
    assert main(args + ["--low-precision", "int4", "--low-precision-dir", str(tmp_path / "q"), "--stats"]) == 0
    out = capsys.readouterr().out
    assert '"precision": "mixed"' in out and '"low_precision_bits": 4' in out
    assert main(args + ["--precision", "mixed"]) == 2
    assert "--low-precision" in capsys.readouterr().err
    assert main(args + ["--low-precision", "int3"]) == 2
    assert "int3" in capsys.readouterr().err
    assert main(args + ["--low-precision", "int4", "--precision-thresholds", "0.9,0.2"]) == 2
    assert "0.9" in capsys.readouterr().err
    # hobbit reads the fitted weights shipped beside the bundled model; a bad weights file is named
    assert main(args + ["--low-precision", "int4", "--policy", "hobbit"]) == 0
    capsys.readouterr()
    bad = tmp_path / "w.json"
    bad.write_text('{"policy": "hobbit", "weights": {"lru": "x"}}')
    assert main(args + ["--low-precision", "int4", "--policy", "hobbit", "--policy-weights", str(bad)]) == 2
    assert "w.json" in capsys.readouterr().err
    assert main(args + ["--policy", "lru", "--policy-weights", str(bad)]) == 2
    assert "--policy-weights" in capsys.readouterr().err
    assert bundled_model_path().is_dir()


def test_eval_agreement_is_total_when_every_miss_loads_full_precision(tmp_path, capsys):
    """`expertyard eval --agreement-tokens`: with thresholds 1,1 no pair accepts a low copy, so the offloaded
    mixed configuration must agree with the resident full-precision model on every token."""
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl named Lily. She liked to play in the park. " * 8)
    assert main(["eval", "--text", str(text), "--max-tokens", "24", "--offload", "--expert-cache-fraction", "0.25",
                 "--low-precision", "int4", "--precision-thresholds", "1,1", "--token-by-token", "--predictor", "none",
                 "--agreement-tokens", "12", "--agreement-prompts", "2", "--agreement-prompt-len", "16", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["teacher_forced_agreement"] == 1.0 and r["identical_prefix"] == [12, 12]
    assert r["offload"]["pairs_low_fraction"] == 0.0 and r["offload"]["misses"] > 0
    assert main(["eval", "--synthetic", "olmoe-1b-7b", "--num-layers", "1"]) == 2
    assert "--agreement-tokens" in capsys.readouterr().err


def test_engine_and_simulator_split_the_expert_cache_alike():
    """The engine's two pools (built from an OffloadConfig) are what `expertyard simulate --low-precision` assumes
    for the same budget: the same byte ratio and the same split function."""
    from expertyard.experts.offload.budget import split_pools
    from expertyard.experts.offload.config import OffloadConfig
    from expertyard.entrypoints.common import bundled_model_path
    from expertyard.trace.mixed_simulate import byte_ratio

    loaded = load_model(bundled_model_path(), "cpu", torch.bfloat16, progress=False,
                        backend_factory=HostLoadedExperts.factory())
    cfg = loaded.config
    for fraction, low_fraction in ((0.25, 0.25), (0.5, 0.4), (0.8, 0.1)):
        offload = OffloadConfig(expert_cache_fraction=fraction, low_precision_bits=4, low_pool_fraction=low_fraction,
                                cpu_compute="off")
        engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=1, max_model_len=16, cuda_graphs=False,
                                                      offload=offload), eos_token_ids=set())
        backend = engine.model.experts
        ratio, _ = byte_ratio(4, cfg.hidden_size, cfg.moe.intermediate_size)
        assert ratio == backend.low.expert_bytes / backend.expert_bytes
        assert split_pools(engine.offload_plan.slots, ratio, low_fraction, cfg.moe.top_k) == \
            (backend.high.capacity, backend.low.capacity)
