"""Predictors by name (`registry.PREDICTORS`): none, next-gate (training-free), trained (`expertyard pregate
fit`), oracle (a forced routing trace). `make_predictor` builds any of them."""

from __future__ import annotations

from expertyard.experts.predictors.base import NoPredictor, Predictor, TraceOraclePredictor
from expertyard.experts.predictors.linear_gate import NextGatePredictor, StackedGatePredictor
from expertyard.experts.predictors.registry import PREDICTOR_NAMES, PREDICTORS, PredictorEntry, make_predictor
from expertyard.experts.predictors.trained import TrainedPredictor

__all__ = ["NoPredictor", "Predictor", "NextGatePredictor", "PREDICTORS", "PREDICTOR_NAMES", "PredictorEntry",
           "StackedGatePredictor", "TraceOraclePredictor", "TrainedPredictor", "make_predictor"]
