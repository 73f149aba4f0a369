"""The HF transformers + accelerate offload baseline: `device_map="auto"` with `max_memory` set to the same
GPU budget, on the same weights (the experts are views of expertyard's pinned host store, not copies)."""

from __future__ import annotations

import re
import time

import torch

from expertyard.loader.load import LoadedModel
from expertyard.models.registry import get_architecture

STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")


def accelerate_offloaded_model(loaded: LoadedModel, gpu_budget_bytes: int, device: torch.device):
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    cfg, backend = loaded.config, loaded.model.experts
    store, i, d = backend.store, cfg.moe.intermediate_size, cfg.hidden_size
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg.hf_config, dtype=store.dtype)
    ours = dict(loaded.model.named_parameters(remove_duplicate=False))
    renames = [(re.compile(p), r) for p, r in get_architecture(cfg.hf_config).renames]
    state = {}
    for key in hf.state_dict():
        if m := STACKED.match(key):
            layer = int(m[1])
            rows = store.pool[store.row[(layer, 0)]:store.row[(layer, 0)] + cfg.moe.num_experts]  # [E, 3*I*D]
            state[key] = rows[:, :2 * i * d].view(-1, 2 * i, d) if m[2] == "gate_up" else rows[:, 2 * i * d:].view(-1, d, i)
            continue
        name = key
        for pattern, repl in renames:
            name = pattern.sub(repl, name)
        state[key] = ours[name].detach().cpu()
    hf.load_state_dict(state, strict=True, assign=True)
    for module in hf.modules():  # rotary buffers are not in the state dict: compute them for real
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            inv_freq, scaling = module.rope_init_fn(module.config, torch.device("cpu")) \
                if getattr(module, "rope_type", "default") != "default" else module.compute_default_rope_parameters(module.config)
            module.inv_freq, module.original_inv_freq, module.attention_scaling = inv_freq, inv_freq.clone(), scaling
    index = device.index or 0
    device_map = infer_auto_device_map(hf, max_memory={index: gpu_budget_bytes, "cpu": 2**40},
                                       no_split_module_classes=hf._no_split_modules)
    return dispatch_model(hf, device_map=device_map).eval(), device_map


@torch.inference_mode()
def accelerate_decode(hf, prompt: list[int], decode_tokens: int, device: torch.device) -> dict:
    ids = torch.tensor([prompt], device=device)

    def timed(n):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t

    timed(2)  # warm-up
    first, total = timed(1), timed(decode_tokens)
    return {"decode_tokens_per_s": (decode_tokens - 1) / max(total - first, 1e-9),
            "decode_ms_per_step": 1e3 * (total - first) / (decode_tokens - 1)}
