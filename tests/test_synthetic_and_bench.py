"""Synthetic real-shape models and the transformers baseline of `expertyard bench`."""

import pytest
import torch

from expertyard.bench.transformers_baseline import transformers_model
from expertyard.bench.weights import active_bytes_per_token
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.errors import ConfigError
from expertyard.loader import load_model
from expertyard.synthetic import SYNTHETIC_MODELS, build_synthetic, synthetic_hf_config

# published shapes: (hidden, layers, routed experts, top-k, expert intermediate)
SHAPES = {
    "mixtral-8x7b": (4096, 32, 8, 2, 14336),
    "qwen3-30b-a3b": (2048, 48, 128, 8, 768),
    "deepseek-v2-lite": (2048, 27, 64, 6, 1408),
    "olmoe-1b-7b": (2048, 16, 64, 8, 1024),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC_MODELS))
def test_synthetic_configs_have_the_real_shapes(name):
    from expertyard.loader.load import model_config_from_hf

    cfg = model_config_from_hf(synthetic_hf_config(name))
    assert (cfg.hidden_size, cfg.num_layers, cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size) == SHAPES[name]


def test_mixtral_active_bytes_match_the_published_active_parameter_count():
    # Mixtral-8x7B: 12.9B active parameters per token (Mistral's figure), embedding table aside
    hf = synthetic_hf_config("mixtral-8x7b", num_layers=1)
    from expertyard.loader.load import build_model, model_config_from_hf

    model = build_model(model_config_from_hf(hf), torch.device("meta"), torch.bfloat16)
    per_layer_expert = 3 * 4096 * 14336 * 2
    attention = (4096 * 4096 * 2 + 4096 * 1024 * 2) * 2
    head = 32000 * 4096 * 2
    expected = 2 * per_layer_expert + attention + head + 4096 * 2 * 3 + 8 * 4096 * 2 + 4096 * 2
    assert active_bytes_per_token(model) == expected


def test_synthetic_num_layers_is_validated():
    with pytest.raises(ConfigError, match="num-layers"):
        synthetic_hf_config("olmoe-1b-7b", num_layers=99)
    with pytest.raises(ConfigError, match="unknown synthetic model"):
        synthetic_hf_config("gpt-5")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_transformers_baseline_shares_our_weights_and_matches_our_logits(arch, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    loaded = load_model(path, "cpu", torch.float32, progress=False)
    hf = transformers_model(loaded, torch.device("cpu"), torch.float32)
    assert hf.model.layers[0].self_attn.o_proj.weight.data_ptr() == \
        loaded.model.layers[0].self_attn.o_proj.weight.data_ptr()
    ids = [5, 9, 33, 2, 71, 4]
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=1, max_model_len=32, cuda_graphs=False), set())
    ours = engine.score(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    torch.testing.assert_close(ours, ref.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1), atol=1e-4, rtol=1e-4)


def test_small_synthetic_model_generates_deterministically():
    def tokens():  # one model alive at a time (each is ~1.2 GB in bfloat16)
        loaded = build_synthetic("olmoe-1b-7b", num_layers=1, device="cpu", dtype=torch.bfloat16, seed=3)
        engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=16, cuda_graphs=False), set())
        return engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].output_token_ids

    assert tokens() == tokens()


def test_offloaded_synthetic_model_has_the_resident_models_experts(tiny_checkpoint):
    """`--synthetic X --offload` is the same model as `--synthetic X`: the host copies hold the numbers the
    resident stacks were drawn with (so offloaded runs can be compared with resident ones)."""
    from expertyard.experts.offload.host_loader import HostLoadedExperts
    from expertyard.experts.resident import ResidentExperts
    from expertyard.loader.load import build_model, model_config_from_hf
    from expertyard.synthetic import init_random_weights

    _, hf = tiny_checkpoint("qwen2_moe")  # a dense layer among MoE layers
    cfg = model_config_from_hf(hf.config)
    resident = build_model(cfg, torch.device("cpu"), torch.float32, ResidentExperts)
    offloaded = build_model(cfg, torch.device("cpu"), torch.float32, HostLoadedExperts.factory())
    init_random_weights(resident, seed=5)
    init_random_weights(offloaded, seed=5)
    i, d = cfg.moe.intermediate_size, cfg.hidden_size
    for layer in cfg.moe_layers:
        for e in range(cfg.moe.num_experts):
            flat = offloaded.experts.store.source((layer, e), torch.device("cpu"))
            assert torch.equal(flat[:2 * i * d].view(2 * i, d), resident.experts.w13[layer][e])
            assert torch.equal(flat[2 * i * d:].view(d, i), resident.experts.w2[layer][e])
    for (name, a), (_, b) in zip(resident.named_parameters(), offloaded.named_parameters()):
        assert torch.equal(a, b), name
