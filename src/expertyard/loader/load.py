"""Load a Hugging Face MoE checkpoint into expertyard's own model code.

The model is built on the meta device, then given empty storage on the target device; every checkpoint
tensor is copied straight into its place (and routed-expert tensors into the ExpertBackend), so no second
copy of the weights exists at any time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from expertyard.config import ModelConfig
from expertyard.errors import CheckpointError
from expertyard.experts.backend import ExpertBackend
from expertyard.experts.resident import ResidentExperts
from expertyard.layers.rotary import rope_parameters
from expertyard.loader.checkpoint import checkpoint_files, iter_tensors, read_hf_config
from expertyard.models.base import CausalLM
from expertyard.models.registry import get_architecture

EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
STACKED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")
IGNORED = re.compile(r"rotary_emb\.inv_freq$")

BackendFactory = Callable[[ModelConfig, torch.device, torch.dtype], ExpertBackend]


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    path: Path | None


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                backend_factory: BackendFactory = ResidentExperts) -> CausalLM:
    """Model with uninitialised storage on `device` (fill it by loading or `init_random_weights`)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    inv_freq, _ = rope_parameters(cfg.hf_config)
    model.rope.inv_freq = inv_freq.to(device)  # buffers are computed, not loaded
    model.set_expert_backend(backend_factory(cfg, device, dtype))
    model.eval().requires_grad_(False)
    return model


def model_config_from_hf(hf_config) -> ModelConfig:
    return get_architecture(hf_config).config_from_hf(hf_config)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               backend_factory: BackendFactory = ResidentExperts, progress: bool = True) -> LoadedModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory; pass a local Hugging Face model directory")
    hf_config = read_hf_config(model_dir)
    spec = get_architecture(hf_config)
    cfg = spec.config_from_hf(hf_config)
    device = torch.device(device)
    files = checkpoint_files(model_dir)
    model = build_model(cfg, device, dtype, backend_factory)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected_params = set(params)
    if cfg.tie_word_embeddings:
        expected_params.discard("lm_head.weight")
    expected_experts = set(model.experts.expected_weights())
    renames = [(re.compile(pattern), repl) for pattern, repl in spec.renames]

    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
              desc=f"loading {model_dir.name}", disable=not progress) as bar:  # ends its line
        current = None
        for path, ckpt_name, read in iter_tensors(files):
            if path != current:  # the bar advances a file at a time
                if current is not None:
                    bar.update(current.stat().st_size)
                current = path
            name = ckpt_name
            for pattern, repl in renames:
                name = pattern.sub(repl, name)
            if m := EXPERT.match(name):
                layer, expert, proj = int(m[1]), int(m[2]), m[3]
                key = (layer, expert, proj)
                if key not in expected_experts:
                    _unexpected(path, ckpt_name, cfg)
                    continue
                if getattr(model.experts, "wants_disk", lambda *_: False)(layer, expert):  # disk tier: keep it there
                    model.experts.load_expert_from_disk(layer, expert, proj, path, ckpt_name)
                else:
                    tensor = read()
                    _checked(path, ckpt_name, lambda: model.experts.load_expert_weight(layer, expert, proj, tensor))
                expected_experts.discard(key)
            elif m := STACKED_EXPERTS.match(name):
                layer, proj = int(m[1]), m[2]
                if layer not in cfg.moe_layers:
                    _unexpected(path, ckpt_name, cfg)
                    continue
                tensor = read()  # the fused layout is read whole (no disk tier for it)
                if tensor.dim() != 3 or tensor.shape[0] != cfg.moe.num_experts:
                    raise CheckpointError(f"{path.name}: tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                                          f"expected [{cfg.moe.num_experts} experts, ...]")
                _checked(path, ckpt_name, lambda: model.experts.load_stacked_weight(layer, proj, tensor))
                projs = ("gate", "up") if proj == "gate_up" else ("down",)
                expected_experts -= {(layer, e, p) for e in range(tensor.shape[0]) for p in projs}
            elif name in params:
                dst, tensor = params[name], read()
                if dst.shape != tensor.shape:
                    raise CheckpointError(f"{path.name}: tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                                          f"the config implies {tuple(dst.shape)}")
                with torch.no_grad():
                    dst.copy_(tensor)
                expected_params.discard(name)
            elif not IGNORED.search(name):
                _unexpected(path, ckpt_name, cfg)
        if current is not None:
            bar.update(current.stat().st_size)
    missing = sorted(expected_params) + [f"layer {l} expert {e} {p}_proj" for l, e, p in sorted(expected_experts)]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s): "
                              f"{', '.join(missing[:8])}{more}")
    return LoadedModel(model=model, config=cfg, path=model_dir)


def _checked(path: Path, name: str, load: Callable[[], None]) -> None:
    try:
        load()
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: tensor {name!r}: {e}") from e


def _unexpected(path: Path, name: str, cfg: ModelConfig) -> None:
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer and int(layer[1]) >= cfg.num_layers:
        return  # extra layers past num_hidden_layers (e.g. multi-token-prediction heads) are not used
    raise CheckpointError(f"{path.name}: tensor {name!r} does not belong to a {cfg.architecture} with this config")
