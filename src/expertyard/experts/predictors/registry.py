"""Pre-gate predictors by name, and the one factory that builds them for the CLI, the engine and the simulator.

Each entry declares what it needs beyond the model and the depth (`needs`), so that a caller can say which
input is missing before building anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from expertyard.errors import ConfigError
from expertyard.experts.predictors.base import NoPredictor, Predictor, TraceOraclePredictor
from expertyard.experts.predictors.linear_gate import NextGatePredictor
from expertyard.experts.predictors.trained import TrainedPredictor


@dataclass(frozen=True)
class PredictorEntry:
    cls: type[Predictor]
    help: str
    build: Callable[..., Predictor]  # (model, depth, model_dir, path) -> Predictor
    needs: tuple[str, ...] = ()  # "model_dir or path": the fitted file; "routing trace": forced routing


def _oracle(model, depth: int, model_dir, path) -> Predictor:
    if getattr(model, "forced_routing", None) is None:
        raise ConfigError("--predictor oracle reads the future of a --routing-trace; give one")
    return TraceOraclePredictor(model.forced_routing, list(model.cfg.moe_layers), depth)


PREDICTORS: dict[str, PredictorEntry] = {
    "none": PredictorEntry(NoPredictor, "no prefetch: load on demand",
                           lambda model, depth, model_dir, path: NoPredictor(depth)),
    "next-gate": PredictorEntry(NextGatePredictor, "the next layers' own routers on this layer's input",
                                lambda model, depth, model_dir, path: NextGatePredictor(model, depth)),
    "trained": PredictorEntry(TrainedPredictor, "fitted by `expertyard pregate fit` (pregate.safetensors)",
                              lambda model, depth, model_dir, path: TrainedPredictor.load(model_dir, model, depth,
                                                                                         path),
                              needs=("model_dir or path",)),
    "oracle": PredictorEntry(TraceOraclePredictor, "the true experts of a forced --routing-trace (upper bound)",
                             _oracle, needs=("routing trace",)),
}
PREDICTOR_NAMES = list(PREDICTORS)


def make_predictor(name: str, model, model_dir: Path | None, depth: int, path: Path | None = None) -> Predictor:
    """The predictor called `name` for `model`, predicting `depth` MoE layers ahead; "trained" reads `path`, else
    `model_dir/pregate.safetensors`."""
    if name not in PREDICTORS:
        raise ConfigError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTOR_NAMES)}")
    if not 1 <= depth <= 3:
        raise ConfigError(f"--prefetch-depth {depth} must be 1, 2 or 3")
    return PREDICTORS[name].build(model, depth, model_dir, path)
