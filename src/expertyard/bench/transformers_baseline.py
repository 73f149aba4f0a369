"""transformers' own model and `generate`, run on the very same weight tensors as expertyard (shared, not
copied), as the baseline of `expertyard bench --compare transformers`."""

from __future__ import annotations

import re
import time

import torch

from expertyard.loader.load import LoadedModel
from expertyard.models.registry import get_architecture

STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")


def transformers_model(loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
    """A transformers model whose parameters are expertyard's tensors (transformers >= 5 expert layout)."""
    from transformers import AutoModelForCausalLM

    hf_config = loaded.config.hf_config
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    ours = dict(loaded.model.named_parameters(remove_duplicate=False))
    renames = [(re.compile(p), r) for p, r in get_architecture(hf_config).renames]
    state = {}
    for key in hf.state_dict():
        if m := STACKED.match(key):
            layer = int(m[1])
            state[key] = loaded.model.experts.w13[layer] if m[2] == "gate_up" else loaded.model.experts.w2[layer]
            continue
        name = key
        for pattern, repl in renames:
            name = pattern.sub(repl, name)
        state[key] = ours[name]
    hf.load_state_dict(state, strict=True, assign=True)
    if loaded.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


class TransformersBaseline:
    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.model = transformers_model(loaded, device, dtype)
        self.device = device

    @torch.inference_mode()
    def _generate(self, ids: torch.Tensor, n: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t

    def bench(self, prompts: list[list[int]], decode_tokens: int) -> dict:
        ids = torch.tensor(prompts, device=self.device)
        self._generate(ids, 4)  # warm-up
        prefill = self._generate(ids, 1)
        total = self._generate(ids, decode_tokens)
        b, n = ids.shape
        return {"prefill_tokens_per_s": b * n / prefill,
                "decode_tokens_per_s": b * (decode_tokens - 1) / max(total - prefill, 1e-9)}
