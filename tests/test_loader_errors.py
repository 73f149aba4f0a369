"""The loader on damaged, sharded, fused and tied checkpoints: clear errors naming file and tensor, and
the same logits (against transformers) whatever the on-disk layout."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertyard.engine.model_runner import ModelRunner
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.scheduler import ScheduledSpan, ScheduledStep
from expertyard.engine.sequence import Sequence
from expertyard.errors import CheckpointError, UnsupportedArchitectureError
from expertyard.loader import load_model

from conftest import tiny_hf_config

ARCH = "qwen3_moe"
TOKENS = [5, 17, 99, 3, 64, 120, 8, 42, 77]
SUPPORTED = ["DeepseekV2ForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM",
             "Qwen3MoeForCausalLM"]


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny qwen3_moe checkpoint, free to damage."""
    src, _ = tiny_checkpoint(ARCH)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _load(path, dtype=torch.float32):
    return load_model(path, "cpu", dtype, progress=False)


def _logits(loaded, tokens=TOKENS) -> torch.Tensor:
    """Logits [L, V] of one prefill of `tokens`."""
    runner = ModelRunner(loaded.model, 1, 32, torch.device("cpu"), next(loaded.model.parameters()).dtype, False)
    seq = Sequence(prompt_token_ids=list(tokens), params=SamplingParams())
    seq.slot = 0
    return runner.run(ScheduledStep(prefills=[ScheduledSpan(seq, 0, len(tokens))], decodes=[]), all_logits=True)


def _hf_logits(hf, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


def _rewrite(file, change):
    """Rewrite a safetensors file with `change(dict of tensors)` applied."""
    tensors = load_file(file)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})


# ---- (a) architecture ---------------------------------------------------------------------------------
@pytest.mark.parametrize("architectures", [["LlamaForCausalLM"], []])
def test_unknown_architecture_lists_supported_ones(ckpt, architectures):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = architectures
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as e:
        _load(ckpt)
    msg = str(e.value)
    for name in SUPPORTED:
        assert name in msg
    if architectures:
        assert "LlamaForCausalLM" in msg


# ---- (b) truncated file -------------------------------------------------------------------------------
def test_truncated_safetensors_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors")):
        _load(ckpt)


def test_truncated_header_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors")):
        _load(ckpt)


# ---- (c) sharded checkpoints --------------------------------------------------------------------------
@pytest.fixture
def sharded(tiny_checkpoint, tmp_path):
    _, hf = tiny_checkpoint(ARCH)
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 3 and (path / "model.safetensors.index.json").is_file()
    return path, shards


def test_sharded_checkpoint_gives_the_same_logits(sharded, ckpt, tiny_checkpoint):
    path, _ = sharded
    _, hf = tiny_checkpoint(ARCH)
    single = _logits(_load(ckpt))
    torch.testing.assert_close(single, _hf_logits(hf), atol=2e-4, rtol=1e-4)
    assert torch.equal(_logits(_load(path)), single)


def test_missing_shard_is_named(sharded):
    path, shards = sharded
    gone = shards[len(shards) // 2]
    gone.unlink()
    with pytest.raises(CheckpointError, match=re.escape(gone.name)):
        _load(path)


# ---- (d) wrong shapes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight",
                                  "model.layers.1.mlp.experts.5.up_proj.weight",
                                  "model.layers.2.mlp.experts.0.down_proj.weight"])
def test_wrong_shape_names_tensor_and_file(ckpt, name):
    def extra_row(t):
        t[name] = torch.cat([t[name], t[name][:1]])

    _rewrite(ckpt / "model.safetensors", extra_row)
    with pytest.raises(CheckpointError) as e:
        _load(ckpt)
    assert name in str(e.value) and "model.safetensors" in str(e.value)


# ---- (e) missing tensors ------------------------------------------------------------------------------
def test_missing_dense_tensor_is_named(ckpt):
    name = "model.layers.1.self_attn.k_norm.weight"
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        _load(ckpt)


def test_missing_expert_tensor_is_named(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.experts.6.gate_proj.weight"))
    with pytest.raises(CheckpointError, match="layer 2 expert 6 gate_proj"):
        _load(ckpt)


# ---- (f) where the weights end up ---------------------------------------------------------------------
def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_weights_land_once_on_the_asked_device_and_dtype(ckpt, tiny_checkpoint):
    _, hf = tiny_checkpoint(ARCH)
    loaded = _load(ckpt, torch.bfloat16)
    model, experts = loaded.model, loaded.model.experts
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert p.device == torch.device("cpu") and p.dtype == torch.bfloat16, name
        assert torch.equal(p, hf_params[name].to(torch.bfloat16)), name
    # routed experts live in the backend only, not as module parameters
    assert not any(".experts." in n for n, _ in model.named_parameters())
    for layer in loaded.config.moe_layers:
        ref = hf.model.layers[layer].mlp.experts
        assert experts.w13[layer].dtype == torch.bfloat16 and experts.w13[layer].device == torch.device("cpu")
        assert torch.equal(experts.w13[layer], ref.gate_up_proj.to(torch.bfloat16))
        assert torch.equal(experts.w2[layer], ref.down_proj.to(torch.bfloat16))
    # everything held equals exactly the checkpoint's tensors: no second copy anywhere
    ckpt_elems = sum(t.numel() for t in load_file(ckpt / "model.safetensors").values())
    held = _storage_bytes(list(model.parameters()) + list(experts.w13.values()) + list(experts.w2.values()))
    assert held == ckpt_elems * 2


def test_tied_embeddings_share_storage(tmp_path):
    cfg = tiny_hf_config(ARCH)
    cfg.tie_word_embeddings = True
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = _load(tmp_path)
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(loaded), _hf_logits(hf), atol=2e-4, rtol=1e-4)


# ---- (g) transformers-5 fused expert layout -----------------------------------------------------------
def _fuse_experts(tensors: dict, num_experts: int):
    per_expert = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    layers = sorted({m[1] for k in tensors if (m := per_expert.match(k))})
    for prefix in layers:
        w = {p: [tensors.pop(f"{prefix}.{e}.{p}_proj.weight") for e in range(num_experts)]
             for p in ("gate", "up", "down")}
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(w["gate"], w["up"])])  # [E, 2I, D]
        tensors[f"{prefix}.down_proj"] = torch.stack(w["down"])  # [E, D, I]
    return layers


def test_fused_expert_layout_gives_identical_logits(ckpt, tiny_checkpoint):
    _, hf = tiny_checkpoint(ARCH)
    per_expert = _logits(_load(ckpt))
    layers = []
    _rewrite(ckpt / "model.safetensors", lambda t: layers.extend(_fuse_experts(t, 8)))
    assert len(layers) == 3
    keys = load_file(ckpt / "model.safetensors").keys()
    assert not any(re.search(r"experts\.\d+\.", k) for k in keys)
    assert torch.equal(_logits(_load(ckpt)), per_expert)
    torch.testing.assert_close(per_expert, _hf_logits(hf), atol=2e-4, rtol=1e-4)


def test_fused_expert_tensor_with_wrong_expert_count_is_named(ckpt):
    name = "model.layers.1.mlp.experts.down_proj"

    def fuse_and_grow(t):
        _fuse_experts(t, 8)
        t[name] = torch.cat([t[name], t[name][:1]])  # 9 experts where the config has 8

    _rewrite(ckpt / "model.safetensors", fuse_and_grow)
    with pytest.raises(CheckpointError) as e:
        _load(ckpt)
    assert name in str(e.value) and "model.safetensors" in str(e.value)


def test_fused_expert_tensor_in_a_dense_layer_is_named(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("qwen2_moe")  # layer 1 is dense (mlp_only_layers=[1])
    shutil.copytree(src, tmp_path / "ckpt")
    name = "model.layers.1.mlp.experts.down_proj"
    _rewrite(tmp_path / "ckpt" / "model.safetensors", lambda t: t.update({name: torch.zeros(8, 64, 32)}))
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "ckpt")
    assert name in str(e.value) and "model.safetensors" in str(e.value)


def test_expertyard_files_beside_a_single_file_model_are_not_read_as_weights(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("qwen3_moe")
    d = tmp_path / "m"
    shutil.copytree(path, d)
    save_file({"layer.0.weight": torch.zeros(2, 2)}, d / "pregate.safetensors")
    save_file({"layer.0.expert.0": torch.zeros(4, dtype=torch.uint8)}, d / "experts.int4.safetensors")
    loaded = load_model(d, "cpu", torch.float32, progress=False)
    assert loaded.config.architecture == "Qwen3MoeForCausalLM"
