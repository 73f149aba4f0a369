"""Record routing traces from the engine: wrap the model's expert backend, score text, collect what it saw."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from expertyard.errors import ConfigError
from expertyard.experts.backend import ExpertBackend, Projection
from expertyard.trace.format import Trace

# T = tokens of a call, K = experts per token, D = hidden size, L = MoE layers

DOC_SEPARATOR = "<|endoftext|>"


@dataclass
class RoutingCall:
    layer: int  # decoder layer index (a MoE layer)
    topk_ids: torch.Tensor  # [T, K] int16, by gate weight descending
    topk_w: torch.Tensor  # [T, K] float32
    x: torch.Tensor | None  # [T, D] float16: the input of the MoE layer, when hidden states are kept


class RecordingBackend(ExpertBackend):
    """Delegates every call to `inner` and records the routing of each `forward` (on the CPU).

    `model.set_expert_backend(RecordingBackend(model.experts))`; read the calls with `take()`.
    """

    def __init__(self, inner: ExpertBackend, save_hidden: bool = False):
        self.inner = inner
        self.save_hidden = save_hidden
        self.calls: list[RoutingCall] = []

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        order = topk_w.argsort(dim=-1, descending=True, stable=True)  # routers sort already; make it a guarantee
        self.calls.append(RoutingCall(layer, topk_ids.gather(1, order).to("cpu", torch.int16),
                                      topk_w.gather(1, order).to("cpu", torch.float32),
                                      x.to("cpu", torch.float16) if self.save_hidden else None))
        return self.inner.forward(layer, x, topk_ids, topk_w)

    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        self.inner.load_expert_weight(layer, expert, proj, tensor)

    def load_stacked_weight(self, layer: int, proj, tensor: torch.Tensor) -> None:
        self.inner.load_stacked_weight(layer, proj, tensor)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return self.inner.expected_weights()

    def __getattr__(self, name: str):  # anything else the inner backend offers (memory_bytes, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def take(self, moe_layers: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The calls since the last `take`, as arrays over the same tokens: experts [T, L, K] int16,
        weights [T, L, K] float32, hidden [T, L, D] float16 or None; L = `moe_layers` in order."""
        calls, self.calls = self.calls, []
        per_layer = {layer: [c for c in calls if c.layer == layer] for layer in moe_layers}
        counts = {layer: sum(c.topk_ids.shape[0] for c in cs) for layer, cs in per_layer.items()}
        assert len(set(counts.values())) == 1, f"MoE layers saw different token counts: {counts}"

        def stack(field: str) -> np.ndarray:
            return torch.stack([torch.cat([getattr(c, field) for c in per_layer[layer]])
                                for layer in moe_layers], dim=1).numpy()

        return stack("topk_ids"), stack("topk_w"), stack("x") if self.save_hidden else None


def split_documents(text: str) -> list[str]:
    """Documents separated by `<|endoftext|>`; without one, paragraphs (blank-line separated)."""
    parts = text.split(DOC_SEPARATOR) if DOC_SEPARATOR in text else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def record_documents(engine, documents, max_tokens: int | None = None, save_hidden: bool = False,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Prefill (score) each token-id document through `engine` and record its routing.

    A document longer than the engine's max_model_len is scored in independent chunks of that length; a chunk
    of a single token (which `score` cannot take) is dropped, and so are documents of fewer than 2 tokens.
    Each document is one sequence. Returns experts, weights, seq_starts, hidden (or None).
    """
    model = engine.model
    moe_layers = list(model.cfg.moe_layers)
    if not moe_layers:
        raise ConfigError("the model has no MoE layers: nothing to trace")
    inner = model.experts
    recorder = RecordingBackend(inner, save_hidden)
    model.set_expert_backend(recorder)
    experts, weights, hidden, starts, total = [], [], [], [], 0
    bar = tqdm(total=max_tokens, unit="tok", desc="trace", disable=not progress)
    try:
        for ids in documents:
            if max_tokens is not None:
                ids = ids[:max_tokens - total]
            chunks = [ids[i:i + engine.max_model_len] for i in range(0, len(ids), engine.max_model_len)]
            chunks = [c for c in chunks if len(c) >= 2]
            if not chunks:
                continue
            for chunk in chunks:
                engine.score(chunk)
            e, w, h = recorder.take(moe_layers)
            starts.append(total)
            total += e.shape[0]
            experts.append(e), weights.append(w), hidden.append(h)
            bar.update(e.shape[0])
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        model.set_expert_backend(inner)
        bar.close()
    if not experts:
        raise ConfigError("no document has 2 or more tokens: nothing to trace")
    return (np.concatenate(experts), np.concatenate(weights), np.array(starts, dtype=np.int64),
            np.concatenate(hidden) if save_hidden else None)


def trace_text(engine, text: str, model_name: str, source: str, max_tokens: int | None = None,
               save_hidden: bool = False, progress: bool = False) -> Trace:
    """Split `text` into documents, tokenise them, prefill each through `engine`: a `prefill` trace."""
    if engine.tokenizer is None:
        raise ConfigError("tracing text needs a tokenizer; this model has none")
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"--max-tokens {max_tokens} must be >= 2")

    def token_docs():  # tokenised lazily: --max-tokens usually needs only the first documents
        for doc in split_documents(text):
            yield engine.tokenizer(doc, verbose=False).input_ids  # long documents are chunked below

    experts, weights, starts, hidden = record_documents(engine, token_docs(), max_tokens, save_hidden, progress)
    return Trace(experts, weights, starts, engine.model.cfg.moe.num_experts, model_name, source, "prefill", hidden)
