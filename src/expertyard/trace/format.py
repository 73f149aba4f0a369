"""The routing trace file (`.npz`): which experts each token used at each MoE layer.

| key | dtype, shape | meaning |
| --- | --- | --- |
| `experts` | int16 [T, L, K] | routed experts of each token at each MoE layer, by gate weight descending when known |
| `weights` | float32 [T, L, K] | their gate weights (as the experts are combined); NaN where not recorded |
| `seq_starts` | int64 [S] | index of the first token of each sequence (0 first, increasing) |
| `num_experts` | int64 scalar | routed experts per layer |
| `model`, `source`, `phase` | str scalars | model name, origin, `prefill` or `decode` |
| `hidden` (optional) | float16 [T, L, D] | the input of each MoE layer, for replaying predictors |

L counts MoE layers only, in model order (dense layers are skipped). This is the format of
`../shared/data/traces/*.npz`; `load_trace` checks every key and names the one that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertyard.errors import ExpertyardError

# T = tokens, L = MoE layers, K = experts per token, S = sequences, D = hidden size

PHASES = ("prefill", "decode")
REQUIRED = ("experts", "weights", "seq_starts", "num_experts", "model", "source", "phase")


class TraceError(ExpertyardError, ValueError):
    """A trace file is missing a key or a key has the wrong dtype, shape or values; the message names it."""


@dataclass
class Trace:
    experts: np.ndarray  # int16 [T, L, K]
    weights: np.ndarray  # float32 [T, L, K]
    seq_starts: np.ndarray  # int64 [S]
    num_experts: int
    model: str
    source: str
    phase: str
    hidden: np.ndarray | None = None  # float16 [T, L, D]

    def __post_init__(self):
        self.experts = np.asarray(self.experts)
        self.weights = np.asarray(self.weights)
        self.seq_starts = np.asarray(self.seq_starts)
        validate(self)
        self.experts = self.experts.astype(np.int16, copy=False)
        self.weights = self.weights.astype(np.float32, copy=False)
        self.seq_starts = self.seq_starts.astype(np.int64, copy=False)
        self.num_experts = int(self.num_experts)

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def sequences(self) -> list[tuple[int, int]]:
        """(start, end) token ranges of the sequences, in order."""
        ends = [*self.seq_starts[1:].tolist(), self.num_tokens]
        return list(zip(self.seq_starts.tolist(), ends))

    def head(self, max_tokens: int) -> Trace:
        """The first `max_tokens` tokens (the last sequence cut short)."""
        if max_tokens < 1:
            raise TraceError(f"max_tokens={max_tokens} must be >= 1")
        if max_tokens >= self.num_tokens:
            return self
        n = max_tokens
        return Trace(self.experts[:n], self.weights[:n], self.seq_starts[self.seq_starts < n], self.num_experts,
                     self.model, self.source, self.phase, None if self.hidden is None else self.hidden[:n])


def _fail(key: str, problem: str) -> None:
    raise TraceError(f"trace key {key!r}: {problem}")


def validate(t: Trace) -> None:
    e, w, s = t.experts, t.weights, t.seq_starts
    if e.ndim != 3 or 0 in e.shape:
        _fail("experts", f"must be a non-empty [T, L, K] array, got shape {e.shape}")
    if not np.issubdtype(e.dtype, np.integer):
        _fail("experts", f"must be integers (int16), got {e.dtype}")
    if not isinstance(t.num_experts, (int, np.integer)) or t.num_experts < 1:
        _fail("num_experts", f"must be a positive integer, got {t.num_experts!r}")
    lo, hi = int(e.min()), int(e.max())
    if lo < 0 or hi >= t.num_experts:
        _fail("experts", f"ids must be in 0..num_experts-1={t.num_experts - 1}, found {lo}..{hi}")
    if e.shape[2] > t.num_experts:
        _fail("experts", f"K={e.shape[2]} experts per token exceeds num_experts={t.num_experts}")
    if w.shape != e.shape:
        _fail("weights", f"shape {w.shape} must equal the shape of 'experts' {e.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        _fail("weights", f"must be float32, got {w.dtype}")
    if s.ndim != 1 or len(s) == 0 or not np.issubdtype(s.dtype, np.integer):
        _fail("seq_starts", f"must be a non-empty 1-D integer array, got {s.dtype} of shape {s.shape}")
    if s[0] != 0 or (np.diff(s) <= 0).any() or s[-1] >= e.shape[0]:
        _fail("seq_starts", f"must start at 0 and increase strictly below T={e.shape[0]}")
    for key in ("model", "source", "phase"):
        if not isinstance(getattr(t, key), str):
            _fail(key, f"must be a string, got {type(getattr(t, key)).__name__}")
    if t.phase not in PHASES:
        _fail("phase", f"must be one of {', '.join(PHASES)}, got {t.phase!r}")
    if t.hidden is not None:
        h = np.asarray(t.hidden)
        if h.ndim != 3 or h.shape[:2] != e.shape[:2] or not np.issubdtype(h.dtype, np.floating):
            _fail("hidden", f"must be float16 [T, L, D] with T, L = {e.shape[:2]}, got {h.dtype} {h.shape}")


def save_trace(path: str | Path, t: Trace) -> None:
    """Write `t` in the exact dtypes of the format (compressed npz)."""
    validate(t)
    arrays = dict(experts=t.experts.astype(np.int16), weights=t.weights.astype(np.float32),
                  seq_starts=t.seq_starts.astype(np.int64), num_experts=np.int64(t.num_experts),
                  model=np.str_(t.model), source=np.str_(t.source), phase=np.str_(t.phase))
    if t.hidden is not None:
        arrays["hidden"] = np.asarray(t.hidden).astype(np.float16)
    with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a name without it
        np.savez_compressed(f, **arrays)


def load_trace(path: str | Path, hidden: bool = True) -> Trace:
    """Read and validate a trace; `hidden=False` skips the (large) hidden states."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TraceError(f"{path}: not a readable .npz trace ({e})") from e
    with z:
        missing = [k for k in REQUIRED if k not in z.files]
        if missing:
            raise TraceError(f"{path}: trace key {missing[0]!r} is missing (a trace has {', '.join(REQUIRED)})")
        scalars = {}
        for key in ("num_experts", "model", "source", "phase"):
            v = z[key]
            if v.ndim != 0:
                _fail(key, f"must be a scalar, got shape {v.shape}")
            scalars[key] = v.item()
        if not isinstance(scalars["num_experts"], int):
            _fail("num_experts", f"must be an integer scalar, got {z['num_experts'].dtype}")
        return Trace(z["experts"], z["weights"], z["seq_starts"], hidden=z["hidden"] if hidden and "hidden" in z.files
                     else None, **scalars)
