"""What one forward pass needs to know about the sequences in it.

A step holds T tokens, flattened: first the tokens of sequences being prefilled (one span each, in order),
then one token for each decoding sequence. Each sequence owns one row ("slot") of the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillSpan:
    slot: int  # KV cache row
    start: int  # position of the span's first token (> 0 when earlier tokens are already cached)
    length: int  # tokens in this step
    offset: int  # index of the span's first token in the flattened step


@dataclass
class AttentionMetadata:
    token_slots: torch.Tensor  # [T] long: KV cache row of every token
    positions: torch.Tensor  # [T] long
    prefills: list[PrefillSpan]  # host-side, walked in order
    num_prefill_tokens: int
    decode_slots: torch.Tensor | None = None  # [B] long, B decoding sequences (None: no decode tokens)
    decode_context_lens: torch.Tensor | None = None  # [B] long: cached tokens including this step's
    decode_max_len: int = 0  # static upper bound of decode_context_lens: how much cache to read

    @property
    def num_decode_tokens(self) -> int:
        return 0 if self.decode_slots is None else self.decode_slots.shape[0]


def sliding_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Q, K] mask: key visible to query when causal and inside the sliding window."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask
