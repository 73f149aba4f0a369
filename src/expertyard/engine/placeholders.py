"""Token ids not known on the host yet: the tokens of a step still in flight (async scheduling).

With async scheduling the engine schedules and launches step t+1 before it has read step t's sampled tokens. A
sequence that samples in step t gets a placeholder in its token list, `placeholder(row)` = -(1 + row), where
`row` is its row in step t's sampled-token tensor (which stays on the device). Runners pass the ids they build
(placeholders included) through `resolve`, which swaps each placeholder for the sampled token on the device: no
host sync. When step t's tokens reach the host, the engine writes the real ids over the placeholders.
"""

from __future__ import annotations

import torch

# T = tokens of the step being built, N = rows of the step in flight


def placeholder(row: int) -> int:
    """The id standing for row `row` of the in-flight step's sampled tokens."""
    return -1 - row


def resolve(ids: torch.Tensor, sampled: torch.Tensor | None) -> torch.Tensor:
    """ids [T] long, placeholders included -> [T] with each placeholder replaced by `sampled` [N] long."""
    if sampled is None or sampled.numel() == 0:
        return ids
    rows = (-1 - ids).clamp_(min=0)  # [T] row of the placeholders (0 for real ids, not used)
    return torch.where(ids < 0, sampled[rows], ids)
