"""Predictors by name: none, next-gate (training-free), trained (`expertyard pregate fit`)."""

from expertyard.experts.predictors.base import NoPredictor, Predictor
from expertyard.experts.predictors.linear_gate import NextGatePredictor, StackedGatePredictor

PREDICTOR_NAMES = ["none", "next-gate", "trained"]

__all__ = ["NoPredictor", "Predictor", "NextGatePredictor", "StackedGatePredictor", "PREDICTOR_NAMES"]
