"""Temperature, top-k, top-p and seeded sampling for a batch of rows with different parameters."""

from __future__ import annotations

import torch

from expertyard.engine.host_ints import host_tensor
from expertyard.engine.sampling_params import SamplingParams

# N = rows (sequences that sample this step), V = vocabulary


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply temperature, top-k and top-p row by row parameters; logits [N, V] float32 -> [N, V]."""
    device = logits.device
    # staged through pinned memory: a blocking copy would wait for the device (and undo async scheduling)
    temps = host_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, device)
    logits = logits / temps[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = host_tensor([p.top_k for p in params], torch.long, device)
        top_p = host_tensor([p.top_p for p in params], torch.float32, device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
        rank = torch.arange(logits.shape[-1], device=device)[None, :]
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (always keep the first);
        # top_p 1 keeps everything (the float32 cumsum can round to 1 before the tail of tiny probabilities)
        drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [N, V] float32 -> next tokens [N] long (on logits.device)."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    probs = filter_logits(logits[sampled], [params[i] for i in sampled]).softmax(dim=-1)
    for row, i in enumerate(sampled):
        tokens[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    return tokens


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model distribution: (chosen [N], top values [N, n], top ids [N, n])."""
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    values, ids = logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, values, ids
