"""What a replay needs besides the trace: the model's shapes (for an expert's bytes) and the predictions of an
engine predictor over the trace's recorded hidden states. Shared by `expertyard simulate` and its mixed-precision
mode."""

from __future__ import annotations

import re
from pathlib import Path

from expertyard.errors import ConfigError
from expertyard.trace.format import Trace, TraceError
from expertyard.trace.simulate import Predictions, predict_trace

SWEEP_FRACTIONS = (0.10, 0.25, 0.50)


def _config(path: Path):
    from expertyard.loader.checkpoint import read_hf_config  # loader modules import torch
    from expertyard.loader.load import model_config_from_hf

    return model_config_from_hf(read_hf_config(path))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def model_config_for(trace: Trace, model: Path | None, bundled: Path):
    """The trace's model config (`model`, the `bundled` model when the trace names it, or the real shapes of a
    model expertyard knows) and its name for reports; (None, None) when unknown."""
    if model is not None:
        return _config(model), model.name
    if _norm(trace.model) == _norm(bundled.name):
        return _config(bundled), f"bundled {trace.model}"
    from expertyard.loader.load import model_config_from_hf
    from expertyard.synthetic import SYNTHETIC_MODELS, synthetic_hf_config

    for name in SYNTHETIC_MODELS:  # real shapes of the models expertyard knows
        if _norm(name) in _norm(trace.model):
            return model_config_from_hf(synthetic_hf_config(name)), f"{name} shapes"
    return None, None


def expert_bytes_for(trace: Trace, expert_bytes: int | None, model: Path | None, bundled: Path
                     ) -> tuple[int | None, str]:
    """Bytes of one routed expert and where the number comes from."""
    if expert_bytes is not None:
        if expert_bytes < 1:
            raise ConfigError(f"--expert-bytes {expert_bytes} must be >= 1")
        return expert_bytes, "--expert-bytes"
    cfg, name = model_config_for(trace, model, bundled)
    if cfg is None:
        return None, "unknown model: traffic in experts"
    return cfg.expert_bytes(2), f"bf16, {name}"


def load_predictions(trace: Trace, trace_path: Path, predictor: str, depth: int, model_path: Path,
                     predictor_path: Path | None = None, progress: bool = True) -> Predictions | None:
    """The predictions `predictor` makes over the trace (None for "none"; the trace itself for "oracle")."""
    if predictor == "none":
        return None
    if not 1 <= depth <= 3:
        raise ConfigError(f"--prefetch-depth {depth} must be 1, 2 or 3")
    if depth >= trace.num_layers:
        raise ConfigError(f"--prefetch-depth {depth} must be below the trace's {trace.num_layers} MoE layers")
    if predictor == "oracle":
        return Predictions.oracle(depth)
    if trace.hidden is None:
        raise TraceError(f"trace key 'hidden' is missing from {trace_path}: the {predictor} predictor reads "
                         "each MoE layer's input; record the trace with `expertyard trace --save-hidden`")
    import torch

    from expertyard.experts.predictors import make_predictor
    from expertyard.loader.load import load_model

    loaded = load_model(model_path, "cpu", torch.float32, progress=progress)
    cfg = loaded.config
    if (len(cfg.moe_layers), cfg.moe.num_experts) != (trace.num_layers, trace.num_experts):
        raise ConfigError(f"the trace ({trace.model}) has {trace.num_layers} MoE layers x {trace.num_experts} "
                          f"experts, the model at {model_path} {len(cfg.moe_layers)} x {cfg.moe.num_experts}: pass "
                          "the --model the trace was recorded with")
    if trace.hidden.shape[2] != cfg.hidden_size:
        raise ConfigError(f"trace key 'hidden' has size {trace.hidden.shape[2]}, the model at {model_path} "
                          f"{cfg.hidden_size}: pass the --model the trace was recorded with")
    engine_predictor = make_predictor(predictor, loaded.model, model_path, depth, predictor_path)
    return predict_trace(engine_predictor, trace, list(cfg.moe_layers))
