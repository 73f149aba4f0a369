"""The decoder shared by every architecture: embed -> [attention, FFN] x L -> norm -> lm_head.

Parameter names follow Hugging Face checkpoints (`model.layers.N.self_attn.q_proj.weight`, ...), so the
loader maps most tensors by name; each architecture file only declares the names that differ.
Attention and FFN of a layer are separately callable (`attention_step`, `ffn_step`), which is what offloaded
and disaggregated execution hook into.
"""

from __future__ import annotations

import torch
from torch import nn

from expertyard.config import ModelConfig
from expertyard.experts.backend import ExpertBackend
from expertyard.layers.attention import Attention
from expertyard.layers.attention_metadata import AttentionMetadata
from expertyard.layers.mla import MultiHeadLatentAttention
from expertyard.layers.mlp import GatedMLP
from expertyard.layers.moe import SparseMoeBlock
from expertyard.layers.norm import RMSNorm
from expertyard.layers.rotary import RotaryEmbedding, rope_parameters

# T = tokens in the step, D = hidden size, V = vocabulary


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        eps = cfg.rms_norm_eps
        attn_cls = MultiHeadLatentAttention if cfg.attention.kind == "mla" else Attention
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = attn_cls(cfg.attention, cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(layer, cfg.moe, cfg.hidden_size)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def attention_step(self, h: torch.Tensor, meta: AttentionMetadata, cache: list[torch.Tensor],
                       rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), meta, cache, rope, cos, sin)

    def ffn_step(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.device("cpu"):  # real numbers even when the model is built on the meta device
            inv_freq, scaling = rope_parameters(cfg.hf_config)
        self.rope = RotaryEmbedding(inv_freq, scaling, cfg.attention.rope_style)
        self.experts: ExpertBackend | None = None
        self.forced_routing = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        self.experts = backend
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.experts = backend

    def force_routing(self, forced) -> None:
        """Replace every router's expert choices by a `ForcedRouting` (None restores the routers)."""
        self.forced_routing = forced
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.forced = forced

    def kv_cache_shapes(self) -> list[list[tuple[int, ...]]]:
        """Per layer, the per-token feature shape of each cache tensor."""
        return [layer.self_attn.kv_cache_shapes() for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_cache: list[list[torch.Tensor]]) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, D] (normed; apply `compute_logits`)."""
        h = self.model.embed_tokens(input_ids)  # [T, D]
        if self.forced_routing is not None:
            self.forced_routing.begin_step(input_ids.shape[0])
        cos, sin = self.rope.cos_sin(meta.positions)
        for i, layer in enumerate(self.layers):
            h = layer.attention_step(h, meta, kv_cache[i], self.rope, cos, sin)
            h = layer.ffn_step(h)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V] float32
