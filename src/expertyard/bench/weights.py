"""How many weight bytes a decode step must read: the memory-bound floor of MoE decoding."""

from __future__ import annotations

from expertyard.models.base import CausalLM


def active_bytes_per_token(model: CausalLM) -> int:
    """Bytes read to decode one token at batch 1: every non-expert weight except the embedding table (one row
    of it is read), plus top_k routed experts in each MoE layer."""
    cfg = model.cfg
    embed = model.model.embed_tokens.weight
    total = 0
    for name, p in model.named_parameters():  # tied lm_head counted once, as the head
        if p is embed and not cfg.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    elem = embed.element_size()
    total += cfg.hidden_size * elem if not cfg.tie_word_embeddings else 0
    return total + len(cfg.moe_layers) * cfg.moe.top_k * cfg.expert_bytes(elem)
