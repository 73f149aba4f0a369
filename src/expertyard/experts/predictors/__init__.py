"""Predictors by name: none, next-gate (training-free), trained (`expertyard pregate fit`)."""

from __future__ import annotations

from pathlib import Path

from expertyard.errors import ConfigError
from expertyard.experts.predictors.base import NoPredictor, Predictor
from expertyard.experts.predictors.linear_gate import NextGatePredictor, StackedGatePredictor
from expertyard.experts.predictors.trained import TrainedPredictor

PREDICTOR_NAMES = ["none", "next-gate", "trained"]


def load_predictor(name: str, model, model_dir: Path | None, depth: int, path: Path | None = None) -> Predictor:
    """The predictor called `name` for `model`; "trained" reads `path`, else `model_dir/pregate.safetensors`."""
    if name == "none":
        return NoPredictor(depth)
    if name == "next-gate":
        return NextGatePredictor(model, depth)
    if name == "trained":
        return TrainedPredictor.load(model_dir, model, depth, path)
    raise ConfigError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTOR_NAMES)}")


__all__ = ["NoPredictor", "Predictor", "NextGatePredictor", "StackedGatePredictor", "TrainedPredictor",
           "PREDICTOR_NAMES", "load_predictor"]
