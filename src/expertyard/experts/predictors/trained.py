"""A pre-gate predictor fitted to the model's own routing (`expertyard pregate fit`), without changing the model.

Pre-gated MoE (ISCA'24) fine-tunes the model so that layer l's router picks the experts of layer l+1. We keep
the model and fit, per MoE layer l, a linear map from the MoE input x_l to the router logits of the next d MoE
layers, initialised from those layers' own routers (the next-gate predictor) and trained against the true
routing. The result is a `StackedGatePredictor`: one matmul per layer at run time, like next-gate.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from expertyard.errors import ConfigError
from expertyard.experts.predictors.base import Predictor
from expertyard.experts.predictors.linear_gate import NextGatePredictor, StackedGatePredictor

# N = tokens collected, T = tokens in a step, D = hidden, E = experts, K = experts per token, n = targets (<= d)

FILE_NAME = "pregate.safetensors"
FORMAT = "expertyard-pregate-v1"
LOSSES = ("topk-ce", "kl")


@dataclass
class RoutingData:
    """What the model did on calibration text, per MoE layer, tokens aligned across layers (CPU tensors)."""

    x: dict[int, torch.Tensor]  # layer -> MoE input [N, D] float16 (as the trace recorder keeps it)
    logits: dict[int, torch.Tensor]  # layer -> router logits [N, E] float32
    ids: dict[int, torch.Tensor]  # layer -> true top-k expert ids [N, K] long
    doc_lens: list[int]  # tokens of each document, in order

    @property
    def num_tokens(self) -> int:
        return sum(self.doc_lens)

    def documents(self, docs: list[int]) -> RoutingData:
        """The tokens of the given documents only."""
        starts = [0]
        for n in self.doc_lens:
            starts.append(starts[-1] + n)
        idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in docs] or [torch.zeros(0, dtype=torch.long)])
        pick = lambda d: {l: t[idx] for l, t in d.items()}  # noqa: E731
        return RoutingData(pick(self.x), pick(self.logits), pick(self.ids), [self.doc_lens[i] for i in docs])


def collect_routing(engine, documents, max_tokens: int | None = None, progress: bool = False) -> RoutingData:
    """Prefill (`engine.score`) each token-id document, recording every MoE layer's input and true experts
    through the trace recorder's `RecordingBackend`; router logits are then `gate.logits(x)`."""
    from expertyard.trace.record import record_documents

    experts, _, starts, hidden = record_documents(engine, documents, max_tokens, save_hidden=True, progress=progress)
    model, n = engine.model, experts.shape[0]
    doc_lens = [int(b - a) for a, b in zip(starts, [*starts[1:], n])]
    x, ids, logits = {}, {}, {}
    with torch.inference_mode():
        for i, layer in enumerate(model.cfg.moe_layers):
            x[layer] = torch.from_numpy(hidden[:, i])  # [N, D] float16, a view: no second copy
            ids[layer] = torch.from_numpy(experts[:, i]).long()  # [N, K]
            gate = model.layers[layer].mlp.gate
            logits[layer] = torch.cat([gate.logits(c.to(engine.device)).cpu()
                                       for c in x[layer].split(8192)])  # [N, E]
    return RoutingData(x, logits, ids, doc_lens)


def recall_at_k(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """pred [N, K'], true [N, K] expert ids -> [N]: the fraction of each token's true experts that pred holds."""
    return (pred[:, :, None] == true[:, None, :]).any(dim=1).float().mean(dim=1)


@torch.inference_mode()
def recall_by_distance(predictor: Predictor, data: RoutingData, chunk: int = 8192) -> list[float]:
    """Mean recall@K of the predictions for the MoE layer j = 1..depth ahead, over tokens and source layers."""
    per_j: dict[int, list[float]] = defaultdict(list)
    for layer, x in data.x.items():
        hits: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        for s in range(0, x.shape[0], chunk):
            for j, (target, ids) in enumerate(predictor.predict(layer, x[s:s + chunk]), start=1):
                hits[j] = hits[j] + recall_at_k(ids.cpu(), data.ids[target][s:s + chunk]).sum()
        for j, h in hits.items():
            per_j[j].append(float(h) / x.shape[0])
    return [sum(v) / len(v) for _, v in sorted(per_j.items())]


class FrequencyPredictor(Predictor):
    """Baseline: the K experts each layer used most often in the training data, whatever the token."""

    name = "frequency"

    def __init__(self, data: RoutingData, moe_layers: list[int], top_k: int, num_experts: int, depth: int):
        super().__init__(depth)
        self.targets = {l: moe_layers[i + 1:i + 1 + depth] for i, l in enumerate(moe_layers)}
        self.top = {l: torch.bincount(data.ids[l].flatten(), minlength=num_experts).topk(top_k).indices
                    for l in moe_layers}  # layer -> [K]

    def predict(self, layer, x):
        return [(t, self.top[t].to(x.device).expand(x.shape[0], -1)) for t in self.targets.get(layer, [])]


def router_fingerprint(model) -> str:
    """sha256 of the routers rounded to bfloat16, |w| < 2**-14 flushed to 0: the same for a bfloat16 checkpoint
    loaded in float32, bfloat16 or float16 (bfloat16 values in float16's normal range convert exactly), and for
    a float32 checkpoint loaded in float32 or bfloat16."""
    h = hashlib.sha256()
    for l in model.cfg.moe_layers:
        w = model.layers[l].mlp.gate.weight.detach().to("cpu", torch.bfloat16)
        w = torch.where(w.abs() < 2.0 ** -14, torch.zeros_like(w), w)
        h.update(str(l).encode() + w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def default_path(model_dir: str | Path) -> Path:
    """The predictor `--predictor trained` reads without --predictor-path: the one `pregate fit` wrote for this
    model (beside a user's model; in the user's cache for the bundled model or a hub snapshot, see
    assets.derived_files_dir), else the one shipped beside the model."""
    from expertyard.assets import derived_files_dir

    fitted = derived_files_dir(Path(model_dir)) / FILE_NAME
    return fitted if fitted.is_file() else Path(model_dir) / FILE_NAME


class TrainedPredictor(StackedGatePredictor):
    """Per MoE layer, a fitted linear map x_l [D] -> router logits of the next d MoE layers [d*E]."""

    name = "trained"

    def __init__(self, moe_layers, top_k, depth, weights, biases=None, meta: dict | None = None):
        super().__init__(list(moe_layers), top_k, depth, weights, biases)
        self.moe_layers = list(moe_layers)
        self.meta = meta or {}  # model identity and how the predictor was fitted; saved with it

    @classmethod
    def fit(cls, model, data: RoutingData, depth: int, epochs: int = 10, lr: float = 3e-3, loss: str = "topk-ce",
            batch_size: int = 512, seed: int = 0, device: torch.device | str | None = None) -> TrainedPredictor:
        """Adam in float32 on `device` (default: the model's), from the next-gate weights. Loss per target
        layer: "kl" = KL(true router softmax || predicted softmax); "topk-ce" = cross-entropy against the true
        top-k gate probabilities, renormalised over the top-k."""
        if loss not in LOSSES:
            raise ConfigError(f"loss={loss!r} must be one of {', '.join(LOSSES)}")
        device = torch.device(device or next(model.parameters()).device)
        init = NextGatePredictor(model, depth)
        e = model.cfg.moe.num_experts
        gen = torch.Generator().manual_seed(seed)
        weights, biases = {}, {}
        for layer, w0 in init.weights.items():
            targets = init.targets[layer]
            w = w0.detach().to(device, torch.float32).clone().requires_grad_(True)  # [n*E, D]
            b = torch.zeros(w.shape[0], device=device, requires_grad=True)  # [n*E]
            opt = torch.optim.Adam([w, b], lr=lr)
            x = data.x[layer]
            true_logits = torch.stack([data.logits[t] for t in targets], dim=1)  # [N, n, E]
            true_ids = torch.stack([data.ids[t] for t in targets], dim=1)  # [N, n, K]
            with torch.enable_grad():
                for _ in range(epochs):
                    for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
                        logp = F.linear(x[idx].to(device, torch.float32), w, b).view(len(idx), len(targets), e)
                        logp = logp.log_softmax(dim=-1)  # [B, n, E]
                        target = _target(true_logits[idx].to(device), true_ids[idx].to(device), loss)
                        step_loss = -(target * logp).sum(dim=-1).mean()  # KL up to a constant
                        opt.zero_grad(set_to_none=True)
                        step_loss.backward()
                        opt.step()
            weights[layer], biases[layer] = w.detach(), b.detach()
        meta = model_identity(model) | {"depth": depth, "fit": {"tokens": data.num_tokens, "epochs": epochs,
                                                               "lr": lr, "loss": loss, "batch_size": batch_size}}
        return cls(model.cfg.moe_layers, model.cfg.moe.top_k, depth, weights, biases, meta)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for layer, w in self.weights.items():
            tensors[f"layer.{layer}.weight"] = w.detach().float().cpu().contiguous()
            tensors[f"layer.{layer}.bias"] = self.biases[layer].detach().float().cpu().contiguous()
        meta = {k: json.dumps(v) for k, v in self.meta.items()} | {"format": FORMAT, "depth": str(self.depth)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, model_dir: str | Path | None, model, depth: int, path: str | Path | None = None) -> TrainedPredictor:
        """From `path`, else default_path(model_dir); refuses a file fitted for another model."""
        if path is None:
            if model_dir is None:
                raise ConfigError("--predictor trained needs --predictor-path FILE (this model has no directory)")
            path = default_path(model_dir)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such predictor file; fit one with `expertyard pregate fit --text FILE` "
                              "or pass --predictor-path FILE")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from e
        if raw.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a pre-gate predictor file (format {raw.get('format')!r}, want {FORMAT!r})")
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        mine = model_identity(model)
        for key in ("architecture", "hidden_size", "num_experts", "top_k", "moe_layers", "router_hash"):
            if meta.get(key) != mine[key]:
                raise ConfigError(f"{path} was fitted for another model ({key} {meta.get(key)!r}, this model has "
                                  f"{mine[key]!r}); fit one for it with `expertyard pregate fit`")
        fitted = int(meta["depth"])
        if depth > fitted:
            raise ConfigError(f"{path} holds a predictor of depth {fitted}; depth {depth} was asked for "
                              f"(fit one with `expertyard pregate fit --depth {depth}`)")
        moe_layers, e = list(mine["moe_layers"]), mine["num_experts"]
        dev = next(model.parameters()).device
        weights, biases = {}, {}
        for i, layer in enumerate(moe_layers):
            rows = len(moe_layers[i + 1:i + 1 + depth]) * e  # the nearest targets come first
            if rows:
                w, b = tensors.get(f"layer.{layer}.weight"), tensors.get(f"layer.{layer}.bias")
                if w is None or b is None or w.shape[0] < rows or w.shape[1:] != (mine["hidden_size"],):
                    raise ConfigError(f"{path}: tensors of layer {layer} missing or of the wrong shape")
                weights[layer], biases[layer] = w[:rows].to(dev, torch.float32), b[:rows].to(dev, torch.float32)
        return cls(moe_layers, mine["top_k"], depth, weights, biases, meta | {"depth": depth, "path": str(path)})


def model_identity(model) -> dict:
    cfg = model.cfg
    return {"architecture": cfg.architecture, "hidden_size": cfg.hidden_size, "num_experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k, "moe_layers": list(cfg.moe_layers), "router_hash": router_fingerprint(model)}


def _target(true_logits: torch.Tensor, true_ids: torch.Tensor, loss: str) -> torch.Tensor:
    """[B, n, E] target distribution over each target layer's experts."""
    probs = true_logits.softmax(dim=-1)  # [B, n, E]
    if loss == "kl":
        return probs
    top = torch.zeros_like(probs).scatter_(-1, true_ids, probs.gather(-1, true_ids))
    return top / top.sum(dim=-1, keepdim=True)
