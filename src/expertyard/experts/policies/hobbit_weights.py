"""The four weights of HOBBIT's eviction priority, and the JSON file that carries fitted ones:

    {"policy": "hobbit",
     "weights": {"lru": 0.25, "lfu": 0.25, "lhu": 0.25, "fld": 0.25},
     "fitted_on": {...},        # free-form: trace, tokens, cache size, command (optional)
     "miss_penalty": {...}}     # free-form: calibration / held-out penalties (optional)

`expertyard simulate --fit-weights OUT.json` writes it; the engine and the simulator read it with
`load_hobbit_weights` (`--policy hobbit --policy-weights FILE`). Only the ratios matter: the priority's order
is unchanged when every weight is scaled by the same positive number.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from expertyard.errors import ConfigError

TERMS = ("lru", "lfu", "lhu", "fld")


@dataclass(frozen=True)
class HobbitWeights:
    lru: float = 0.25  # recency
    lfu: float = 0.25  # frequency in the sequence
    lhu: float = 0.25  # share of the expert's requests that needed full precision
    fld: float = 0.25  # nearness of the expert's layer in the layer cycle

    def __post_init__(self):
        for term in TERMS:
            v = getattr(self, term)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"hobbit weight {term}={v!r} must be a finite number >= 0")
        if sum(self.as_tuple()) <= 0:
            raise ConfigError(f"hobbit weights {self.as_dict()} are all 0: at least one must be > 0")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.lru, self.lfu, self.lhu, self.fld)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def normalised(self) -> HobbitWeights:
        """The same priority order with weights summing to 1."""
        s = sum(self.as_tuple())
        return HobbitWeights(*(v / s for v in self.as_tuple()))


def save_hobbit_weights(path: str | Path, weights: HobbitWeights, fitted_on: dict | None = None,
                        miss_penalty: dict | None = None) -> None:
    doc = {"policy": "hobbit", "weights": weights.as_dict()}
    if fitted_on is not None:
        doc["fitted_on"] = fitted_on
    if miss_penalty is not None:
        doc["miss_penalty"] = miss_penalty
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def load_hobbit_weights(path: str | Path) -> HobbitWeights:
    """Read a weights file; every error names the file and the key that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such hobbit weights file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON hobbit weights file ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must hold a JSON object with keys 'policy' and 'weights'")
    if doc.get("policy") != "hobbit":
        raise ConfigError(f"{path}: key 'policy' must be \"hobbit\", got {doc.get('policy')!r}")
    w = doc.get("weights")
    if not isinstance(w, dict):
        raise ConfigError(f"{path}: key 'weights' must be an object with keys {', '.join(TERMS)}, got {w!r}")
    unknown = sorted(set(w) - set(TERMS))
    if unknown:
        raise ConfigError(f"{path}: key 'weights.{unknown[0]}' is not a hobbit term (terms: {', '.join(TERMS)})")
    for term in TERMS:
        if term not in w:
            raise ConfigError(f"{path}: key 'weights.{term}' is missing (terms: {', '.join(TERMS)})")
        v = w[term]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{path}: key 'weights.{term}' must be a finite number >= 0, got {v!r}")
    try:
        return HobbitWeights(**{t: float(w[t]) for t in TERMS})
    except ConfigError as e:
        raise ConfigError(f"{path}: key 'weights': {e}") from None
