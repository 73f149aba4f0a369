"""The host CPU as the second pipe: per MoE layer, once its routing is known, each missed expert is either copied
over the link and computed on the device, or computed on the host CPU straight from host memory (no copy of its
weights; only the layer input and the partial output cross the link).

The split minimises the layer's finish time under the measured cost model (`experts/cpu/costs.py`): copies run
one after another on the link (k copies take k x copy time), the CPU computes its share meanwhile (the sum of its
experts' times, each a function of the expert's token count and the CPU precision). The thread that computes
on the CPU is also the one that launches the device's work and keeps the books, measured per visit while
running: copies overlap that work, CPU compute adds to it, so the layer ends at max(link, host + CPU). Prefill chunks and large batches go to the link (CPU time grows with tokens, a copy does not);
batch-1 decode splits. Experts computed on the CPU are not admitted to the cache: copying them in behind the
layer was measured to delay the next layers' demand copies more than their later hits repay (DeepSeek-V2-Lite
and Mixtral-8x7B on one H200, docs/offloading.md); the cache changes by the copies the split decides.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.cpu import CpuExpertCompute, HybridCosts

# T = tokens, K = experts per token, D = hidden


@dataclass
class HybridStats:
    cpu_experts: int = 0  # expert visits computed on the host CPU
    copied_experts: int = 0  # missed expert visits copied to the device
    cpu_seconds: float = 0.0  # host time in CPU expert compute (including the result's staging)
    cpu_predicted: float = 0.0  # what the cost model predicted for the same work
    per_layer: dict[int, list[int]] = field(default_factory=dict)  # layer -> [on CPU, copied]
    bound_s: float = 0.0  # per visit, the best split of its misses at the start-up costs, summed
    visits: list[tuple[dict[int, int], list[int]]] | None = None  # with `record_visits`: per visit (expert ->
    # tokens, the experts that missed), for bounds at other miss sets (benchmarks)


def best_split(cpu_costs: list[float], copy_s: float, host_s: float = 0.0) -> tuple[int, float]:
    """(how many misses go to the CPU, the layer's finish time): the cheapest-on-CPU misses go to the CPU, the
    rest are copied one after another; `cpu_costs` sorted ascending. `host_s`: the host thread's own work of a
    visit (launches, bookkeeping), which runs beside the copies but before or after CPU compute, never beside
    it: the layer ends at max(link, host + CPU)."""
    best_n, best_t = 0, max(len(cpu_costs) * copy_s, host_s)
    cpu_total = host_s
    for n, c in enumerate(cpu_costs, start=1):
        cpu_total += c
        t = max(cpu_total, (len(cpu_costs) - n) * copy_s)
        if t < best_t:
            best_n, best_t = n, t
    return best_n, best_t


class HybridExecutor:
    def __init__(self, compute: CpuExpertCompute, costs: HybridCosts, mode: str, precision: str,
                 device: torch.device, dtype: torch.dtype, learn: bool = True, copy_bytes: int | None = None):
        self.compute_engine, self.costs = compute, costs
        self.mode, self.precision = mode, precision  # mode "auto": cost model; "on": every miss on the CPU
        self.device, self.dtype = device, dtype
        self.cuda = device.type == "cuda"
        self.copy_bytes = copy_bytes or costs.expert_bytes["full"]  # what one copy moves over the link
        self.copy_s = costs.copy_s(self.copy_bytes)
        store = compute.store
        # `on` with every expert readable at `precision` without its file: no miss ever needs a cache slot
        self.computes_every_miss = mode == "on" and all(store.in_memory(k, precision) for k in store.keys)
        self._x = self._w = self._y = None  # pinned staging buffers (CUDA), grown on demand
        self.learn = learn  # correct the CPU figures by measured visits (off: the split follows `costs` alone)
        self.cpu_scale = 1.0  # measured / predicted CPU time of the visits so far (contention, per-call overhead)
        self._seen = [0.0, 0.0]  # predicted, measured seconds since start-up
        self.host_s = 0.0  # the host thread's own seconds per visit besides CPU compute (a moving average)
        self._last_visit: tuple[int, float, float] | None = None  # (layer, routing read at, CPU seconds since)
        self.reset_stats()

    def reset_stats(self, record_visits: bool = False) -> None:
        """Counters afresh; `record_visits` also keeps every visit's routing (memory grows with the run: for
        benchmarks, not for serving)."""
        self.stats = HybridStats(visits=[] if record_visits else None)

    # ---- on the device's schedule ---------------------------------------------------------------------
    def stage_input(self, x: torch.Tensor, topk_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start copying the layer input x [T, D] and gate weights [T, K] to the host (before the routing event,
        so they land with it)."""
        if not self.cuda:
            return x, topk_w
        t = x.shape[0]
        if self._x is None or self._x.shape[0] < t:
            n = max(t, 64)
            self._x = torch.empty(n, x.shape[1], dtype=x.dtype, pin_memory=True)
            self._w = torch.empty(n, topk_w.shape[1], dtype=torch.float32, pin_memory=True)
        self._x[:t].copy_(x, non_blocking=True)
        self._w[:t].copy_(topk_w, non_blocking=True)
        return self._x[:t], self._w[:t]

    def assign(self, layer: int, ids: list[int], state: ExpertCacheState) -> list[int]:
        """The missed experts of this visit that the CPU computes (the rest are copied). `ids`: the visit's
        routing, flat [T * K]."""
        counts = Counter(ids)
        missed = [e for e in counts if state.slot_of((layer, e)) is None]
        if self.stats.visits is not None:
            self.stats.visits.append((counts, list(missed)))
        if not missed:
            return []
        self.stats.bound_s += self._visit_bound_s(counts, missed)
        store = self.compute_engine.store
        candidates = [e for e in missed if store.in_memory((layer, e), self.precision)]  # not from disk files
        if self.mode == "on":
            on_cpu = candidates
        else:
            candidates.sort(key=lambda e: counts[e])
            n, _ = best_split([self.cpu_scale * self.costs.cpu_s(self.precision, counts[e]) for e in candidates],
                              self.copy_s, self.host_s)
            on_cpu = candidates[:n]
        split = self.stats.per_layer.setdefault(layer, [0, 0])
        split[0] += len(on_cpu)
        split[1] += len(missed) - len(on_cpu)
        self.stats.cpu_experts += len(on_cpu)
        self.stats.copied_experts += len(missed) - len(on_cpu)
        return on_cpu

    def compute(self, layer: int, staged: tuple[torch.Tensor, torch.Tensor], ids: list[int], on_cpu: list[int],
                shape: torch.Size) -> torch.Tensor:
        """The CPU's share of the layer, y [T, D] on the device (its copy queued on the current stream)."""
        t0 = time.perf_counter()
        x_host, w_host = staged  # [T, D], [T, K] on the host
        flat_ids = torch.tensor(ids, dtype=torch.long).view(shape)  # [T, K]
        items = []
        for e in on_cpu:
            tok, k = (flat_ids == e).nonzero(as_tuple=True)
            items.append(((layer, e), self.precision, tok, w_host[tok, k]))
        y = self.compute_engine.run(x_host, items)  # [T, D] float32
        if self.cuda:
            out = self._host_output(y.shape)
            out.copy_(y)
            y = out.to(self.device, non_blocking=True)
        else:
            y = y.to(self.dtype)
        self._learn(sum(self.costs.cpu_s(self.precision, len(item[2])) for item in items), time.perf_counter() - t0)
        return y

    def _host_output(self, shape: torch.Size) -> torch.Tensor:
        """A pinned [T, D] buffer for the CPU's share on its way to the device. Its own buffer, not one of
        `stage_input`'s: a graph prologue stages the input in its own buffers and never calls `stage_input`.
        Reused across layers: the next layer writes it only after its routing event, which follows this copy on
        the device's stream."""
        if self._y is None or self._y.shape[0] < shape[0] or self._y.shape[1] != shape[1]:
            self._y = torch.empty(max(shape[0], 64), shape[1], dtype=self.dtype, pin_memory=True)
        return self._y[:shape[0]]

    def routing_read(self, layer: int, wait_started: float, wait_ended: float) -> None:
        """The backend read `layer`'s routing between these host-clock times: the host thread's own time since
        the previous layer's read of the same step, less that layer's CPU compute, is one sample of `host_s`
        (the gap across steps holds the engine's sampling and is not sampled)."""
        last, self._last_visit = self._last_visit, (layer, wait_ended, 0.0)
        if self.learn and last is not None and layer > last[0]:
            sample = max(wait_started - last[1] - last[2], 0.0)
            self.host_s += self.HOST_EMA * (sample - self.host_s)

    HOST_EMA = 0.05  # weight of the newest visit in `host_s` (~20 visits: follows a change of batch size)

    def _learn(self, predicted: float, measured: float) -> None:
        """Correct the start-up figures by what CPU visits really take here (host memory shared with the link's
        copies, the per-call overhead of a small expert)."""
        self.stats.cpu_seconds += measured
        self.stats.cpu_predicted += predicted
        if self._last_visit is not None:
            layer, read_at, cpu = self._last_visit
            self._last_visit = (layer, read_at, cpu + measured)
        self._seen[0] += predicted
        self._seen[1] += measured
        if self.learn and self._seen[0] > 0:
            self.cpu_scale = self._seen[1] / self._seen[0]

    # ---- reporting ------------------------------------------------------------------------------------
    def _visit_bound_s(self, counts: dict[int, int], missed: list[int]) -> float:
        return best_split(sorted(self.costs.cpu_s(self.precision, counts[e]) for e in missed), self.copy_s)[1]

    def bound_s(self, visits: list[tuple[dict[int, int], list[int]]]) -> float:
        """Seconds the misses of `visits` ((expert -> tokens, missed experts) per visit) need at least: per visit,
        the best split between the link and the CPU at the measured costs."""
        return sum(self._visit_bound_s(counts, missed) for counts, missed in visits)

    def report(self, tokens: int) -> dict:
        s, tokens = self.stats, max(tokens, 1)
        return {"cpu_compute": self.mode, "cpu_precision": self.precision,
                "cpu_experts_per_token": s.cpu_experts / tokens, "copied_misses_per_token": s.copied_experts / tokens,
"cpu_ms_per_token": 1e3 * s.cpu_seconds / tokens,
                "miss_bound_ms_per_token": 1e3 * s.bound_s / tokens,
                "cpu_measured_vs_model": s.cpu_seconds / s.cpu_predicted if s.cpu_predicted else 0.0,
                "host_us_per_visit": 1e6 * self.host_s,
                "split_per_layer": {str(l): {"cpu": c, "copied": g} for l, (c, g) in sorted(s.per_layer.items())},
                "costs": self.costs.to_dict()}
