"""Experts in host memory behind a device expert cache, with pre-gated prefetch on a dedicated copy stream and,
optionally, misses computed on the host CPU (`experts/offload/hybrid.py`).

A MoE layer visit on CUDA (the decode path, when one visit's experts fit the cache):
  1. the predictor scores the next layers' experts from x (one stacked matmul, on the GPU);
  2. routing and predictions (and, with CPU compute, x itself) go to a pinned host buffer (async copy + event);
  3. the expert FFN is launched at once over the *resident* experts: the pool's device table maps
     expert -> slot, and pairs whose expert is not resident map to -1 and are skipped by the kernel;
  4. the host waits for the routing event (the one host sync of the layer: the GPU keeps computing step 3
     meanwhile), asks the cache bookkeeping which experts missed, and the hybrid scheduler splits the misses
     between copies (then a second FFN pass over just those pairs, once their copies land) and the host CPU
     (whose partial sum is copied back and added); on the hit path neither exists;
  5. predicted experts that are not resident are copied next, protected until their layer runs.
A slot is only overwritten after the last kernel that read it (one event per slot), and a kernel reading a
prefetched slot waits for that slot's copy. On the CPU, and for visits that need more experts than the cache
holds (long prefills), experts are loaded first and computed in groups that fit.

The parts: `SlotPool` per precision (slot tensor, device table, events), `TransferEngine` (copy stream, stats,
timeline), `HybridExecutor` (CPU compute and the per-layer split); this class only sequences them.
"""

from __future__ import annotations

import os
import time
from collections import deque

import torch

from expertyard.config import ModelConfig
from expertyard.experts.backend import ExpertBackend
from expertyard.experts.cache_state import CacheCounters
from expertyard.experts.offload.graph_staging import GraphStaging
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.mixed_cache import MixedPrecisionCache, PoolLoad, PrecisionCounters, adaptive_prefetch
from expertyard.experts.offload.slot_pool import LowPrecisionPool, SlotPool
from expertyard.experts.offload.transfer import TransferEngine
from expertyard.experts.precision import LOW, PrecisionThresholds, pair_plan
from expertyard.experts.predictors.base import NoPredictor, Predictor

# T = tokens, K = experts per token, E = experts per layer, D = hidden


def graph_prologue_on() -> bool:
    """EXPERTYARD_GRAPH_PROLOGUE=1 captures each visit's routing read-back and resident FFN in the decode graph
    pieces (`graph_prologue`); off by default until it has been measured on a GPU."""
    return os.environ.get("EXPERTYARD_GRAPH_PROLOGUE", "0") == "1"


class OffloadedExperts(ExpertBackend):
    """Built whole by `experts/offload/build.py:build_offloaded_experts`; implements `OffloadingBackend`."""

    graph_safe = False  # the host learns each layer's routing: decode runs in per-layer graph pieces

    def __init__(self, cfg: ModelConfig, host: HostLoadedExperts, pool: SlotPool,
                 transfer: TransferEngine, predictor: Predictor | None = None, low: LowPrecisionPool | None = None,
                 mixed: MixedPrecisionCache | None = None, precision_mode: str = "full",
                 thresholds: PrecisionThresholds | None = None, hybrid=None):
        self.cfg, self.host, self.store, self.device = cfg, host, host.store, pool.device
        self.num_experts = cfg.moe.num_experts
        self.keys = host.keys
        self.expert_bytes = self.store.expert_bytes
        # `pool`: the cache of the one-pool paths (full precision, or int4 shared with the CPU); with `mixed`, the
        # full-precision pool beside `low`
        self.pool, self.high, self.low, self.mixed = pool, pool, low, mixed
        self.pools: dict[str, SlotPool] = {pool.name: pool} | ({low.name: low} if low is not None else {})
        self.state = pool.state  # its bookkeeping (also used by visits too large for the pools)
        self.transfer = transfer
        self.predictor = predictor or NoPredictor()
        self.precision_mode = precision_mode
        self.thresholds = thresholds or PrecisionThresholds()
        self.hybrid = hybrid
        self.cuda = self.device.type == "cuda"
        self.pending: dict[int, list] = {}  # layer -> copy events of its prefetched experts
        self.host_buf = torch.empty(1 << 16, dtype=torch.int32, pin_memory=self.cuda)
        self._graph_io: dict[tuple[int, int], GraphStaging] = {}  # (layer, bucket rows) -> a graph piece's staging
        self.now = 0
        self.visits: list[tuple[int, list[int]]] | None = None  # set to [] to record every visit's experts
        self.reset_stats()

    def load_expert_weight(self, layer: int, expert: int, proj, tensor: torch.Tensor) -> None:
        """Weights go to the host store (a cached copy is refreshed on its next load)."""
        self.host.load_expert_weight(layer, expert, proj, tensor)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return self.host.expected_weights()

    def describe(self) -> str:
        """The expert cache's pools, one line."""
        pools = " + ".join(f"{p.capacity} {p.name}-precision slots ({p.expert_bytes / 2**20:,.2f} MiB each)"
                           for p in self.pools.values())
        return f"expert cache: {pools}, {self.precision_mode} precision"

    @property
    def stats(self):
        return self.transfer.stats

    @property
    def timeline(self):
        return self.transfer.timeline

    def on_sequence_start(self) -> None:
        for pool in self.pools.values():
            pool.state.policy.on_sequence_start()

    def reset_stats(self, record_visits: bool = False) -> None:
        """Counters afresh; `record_visits`: the CPU split also keeps every visit (benchmarks' bounds)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for pool in self.pools.values():
            pool.state.counters = CacheCounters()
        if self.mixed is not None:
            self.mixed.counters = PrecisionCounters()
        self.pairs_served = {"full": 0, "low": 0, "skipped": 0}  # (token, expert) pairs of mixed-precision visits
        self.transfer.stats = type(self.transfer.stats)()
        self.routing_wait_s: deque[float] = deque(maxlen=1 << 16)  # the latest visits' routing read-back
        self.routing_wait_total_s = 0.0
        if self.hybrid is not None:
            self.hybrid.reset_stats(record_visits)
        self._predicted: dict[int, set[int]] = {}
        self._pred_hits = self._pred_total = self._pred_needed = 0

    # ---- the seam -------------------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(layer, x, topk_ids, topk_w, self.predictor.predict(layer, x))

    def forward_routed(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                       preds: list[tuple[int, torch.Tensor]], prologue: dict | None = None) -> torch.Tensor:
        """`forward` with the predictions already made (piecewise CUDA graphs compute them in the graph, and with
        them the `graph_prologue`)."""
        fits = topk_ids.numel() <= self.state.capacity
        all_on_cpu = self.hybrid is not None and self.hybrid.computes_every_miss  # no miss needs a slot
        if self.mixed is not None and topk_ids.numel() <= min(self.high.capacity, self.low.capacity):
            y = self._forward_mixed(layer, x, topk_ids, topk_w, preds)
        elif (self.cuda or self.hybrid is not None) and fits or all_on_cpu:
            y = self._forward_speculative(layer, x, topk_ids, topk_w, preds, prologue)
        else:
            y = self._forward_loaded_first(layer, x, topk_ids, topk_w, preds)
        assert prologue is None or self.mixed is None and fits, "a graph prologue for a visit of another path"
        self.now += 1
        return y

    # ---- inside decode graph pieces -------------------------------------------------------------------
    def graph_prologue(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                       preds: list[tuple[int, torch.Tensor]]) -> dict | None:
        """Steps 2-3 of a visit, captured in the decode graph piece that ends at `layer`: routing, predictions and
        (with CPU compute) x and the gate weights packed for the host (`GraphStaging`), and the FFN over the
        resident pairs. The host then pays one graph launch and one copy for what took ~20 kernel launches per
        layer. None where the visit takes another path (mixed precision, more pairs than slots)."""
        if not self.cuda or self.mixed is not None or topk_ids.numel() > self.state.capacity or not graph_prologue_on():
            return None
        parts = [(topk_ids, torch.int32)] + [(p, torch.int32) for _, p in preds]
        if self.hybrid is not None:
            parts += [(x, x.dtype), (topk_w, torch.float32)]  # [Bb, D], [Bb, K]
        key = (layer, x.shape[0])
        if key not in self._graph_io:  # allocated at the warm-up before the capture: fixed addresses
            self._graph_io[key] = GraphStaging([(t.shape, dtype) for t, dtype in parts], self.device)
        self._graph_io[key].pack([t for t, _ in parts])
        return {"staging": key, "y": self.pool.ffn(x, self.pool.table[layer][topk_ids], topk_w)}  # y [Bb, D]

    def before_graph_piece(self, layer: int) -> None:
        """The piece's resident FFN reads slots that prefetches may still be filling: wait for them."""
        if self.cuda:
            self.transfer.wait(torch.cuda.current_stream(self.device), self.pending.pop(layer, []))

    def _start_routing(self, parts: list[torch.Tensor]):
        """Start moving routing and predictions (int32) to the host: into a pinned buffer, then an event (CUDA)."""
        flat = torch.cat([p.reshape(-1).to(torch.int32) for p in parts])
        if not self.cuda:
            return flat
        n = flat.numel()
        if n > self.host_buf.numel():
            self.host_buf = torch.empty(2 * n, dtype=torch.int32, pin_memory=True)
        self.host_buf[:n].copy_(flat, non_blocking=True)
        routed = torch.cuda.Event()
        routed.record()
        return routed, [self.host_buf[:n]]  # the pinned tensors that hold the values once the event has passed

    def _read_routing(self, started) -> list[int]:
        """The values `_start_routing` (or a graph prologue) sent: the layer's one host sync (kernels launched
        between the two calls keep the GPU busy meanwhile)."""
        t0 = time.perf_counter()
        if self.cuda:
            routed, host = started
            routed.synchronize()
            out = [v for h in host for v in h.reshape(-1).tolist()]
        else:
            out = started.tolist()
        wait = time.perf_counter() - t0
        self.routing_wait_s.append(wait)
        self.routing_wait_total_s += wait
        return out

    def _routing_to_host(self, parts: list[torch.Tensor]) -> list[int]:
        return self._read_routing(self._start_routing(parts))

    def _forward_speculative(self, layer, x, topk_ids, topk_w, preds, prologue=None):
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            self.transfer.wait(compute, self.pending.pop(layer, []))
        t = x.shape[0]
        if prologue is not None:  # steps 2-3 ran in the graph piece just replayed; its rows past T are padding
            staging = self._graph_io[prologue["staging"]]
            host = staging.host_views(t)
            started = (staging.send(), host[:len(preds) + 1])
            staged = tuple(host[-2:]) if self.hybrid is not None else None  # x [T, D], weights [T, K]
            y = prologue["y"][:t]
        else:
            staged = self.hybrid.stage_input(x, topk_w) if self.hybrid is not None else None  # lands with routing
            started = self._start_routing([topk_ids] + [p for _, p in preds])
            with self.transfer.span(f"moe L{layer}", compute):
                y = self.pool.ffn(x, self.pool.table[layer][topk_ids], topk_w)  # resident pairs only
        t_wait = time.perf_counter()
        flat = self._read_routing(started)
        ids, pred_ids = self._split(flat, topk_ids.shape, preds)
        used = list(dict.fromkeys(ids))
        self._score_prediction(layer, used)
        if self.hybrid is not None:
            self.hybrid.routing_read(layer, t_wait, time.perf_counter())
        on_cpu = self.hybrid.assign(layer, ids, self.state) if self.hybrid is not None else []
        copied = [e for e in used if e not in on_cpu]
        loads = self.state.access(layer, copied, self.now)
        if loads:
            self.transfer.copy(self.pool, loads)
            if self.cuda:
                self.transfer.wait(compute, self.pool.ready_events(loads))
            missed = {ld.key[1]: ld.slot for ld in loads}
            miss_slots = self._slots_tensor([missed.get(e, -1) for e in ids], topk_ids.shape)
            with self.transfer.span(f"moe miss L{layer}", compute):
                y = y + self.pool.ffn(x, miss_slots, topk_w)
        self.pool.mark_read(compute, layer, copied)
        self.state.end_visit(layer, copied)  # first, so that a prediction may replace what this layer just used
        if on_cpu:
            with self.transfer.host_span(f"cpu L{layer}: {len(on_cpu)} experts"):
                y = y + self.hybrid.compute(layer, staged, ids, on_cpu, topk_ids.shape)
            self.state.counters.misses += len(on_cpu)  # computed where they are: not admitted to the cache
        self._prefetch(pred_ids)
        return y

    def _forward_loaded_first(self, layer, x, topk_ids, topk_w, preds):
        """Learn the routing, then load and compute in groups of experts that fit the cache."""
        flat = self._routing_to_host([topk_ids] + [p for _, p in preds])
        ids, pred_ids = self._split(flat, topk_ids.shape, preds)
        used = list(dict.fromkeys(ids))
        self._score_prediction(layer, used)
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if len(used) > self.state.capacity - len(self.state.protected):
            self.state.release_prefetched()  # make room: predictions yield to experts needed now
        room = max(self.cfg.moe.top_k, self.state.capacity - len(self.state.protected))
        y = None
        for start in range(0, len(used), room):
            group = used[start:start + room]
            loads = self.state.access(layer, group, self.now)
            self.transfer.copy(self.pool, loads)
            if self.cuda:
                self.transfer.wait(compute, self.pool.ready_events(loads))
            slot_of = {e: self.state.slot_of((layer, e)) for e in group}
            slots = self._slots_tensor([slot_of.get(e, -1) for e in ids], topk_ids.shape)
            with self.transfer.span(f"moe L{layer}", compute):
                part = self.pool.ffn(x, slots, topk_w)
            y = part if y is None else y + part
            self.pool.mark_read(compute, layer, group)
            self.state.end_visit(layer, group)
        self._prefetch(pred_ids)
        return y

    def _forward_mixed(self, layer, x, topk_ids, topk_w, preds):
        """Token-level precision (HOBBIT) over two pools. The device decides each pair's source from residency
        (`precision.pair_plan`) and computes the resident ones at once: the full-precision kernel over full
        copies, the dequantizing kernel over low copies accepted by their pair, skips renormalised away. The
        host then reads routing and levels (the layer's one sync), loads what missed at the precision its pairs
        need, and a second pass computes just the missed pairs."""
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            self.transfer.wait(compute, self.pending.pop(layer, []))
        force = LOW if self.precision_mode == "low" else None
        plan = pair_plan(topk_ids, topk_w, self.high.table[layer], self.low.table[layer], self.thresholds, force)
        with self.transfer.span(f"moe L{layer}", compute):
            y = self.high.ffn(x, plan.high_slots, plan.weights) + self.low.ffn(x, plan.low_slots, plan.weights)
        pairs = topk_ids.numel()
        flat = self._routing_to_host([topk_ids, plan.level] + [p for _, p in preds])
        ids, level = flat[:pairs], flat[pairs:2 * pairs]
        _, pred_ids = self._split(flat[pairs:], (1, pairs), preds)  # skip the levels, keep the predictions
        self._score_prediction(layer, list(dict.fromkeys(ids)))
        visit = self.mixed.access(layer, list(zip(ids, level)), self.now)
        for kind, n in visit.pairs_served.items():
            self.pairs_served[kind] += n
        self._copy_pools(visit.loads)
        if visit.missed_pairs:
            if self.cuda:
                self.transfer.wait(compute, [self.pools[pl.pool].ready[pl.load.slot] for pl in visit.loads])
            slots = {name: [-1] * pairs for name in self.pools}
            for p in visit.missed_pairs:
                pool, slot = visit.miss_source[ids[p]]
                slots[pool][p] = slot
            for name, pool in self.pools.items():
                if any(s >= 0 for s in slots[name]):
                    with self.transfer.span(f"moe {name} miss L{layer}", compute):
                        y = y + pool.ffn(x, self._slots_tensor(slots[name], topk_ids.shape), plan.weights)
        self.high.mark_read(compute, layer, visit.high_used)
        self.low.mark_read(compute, layer, visit.low_used)
        self.mixed.end_visit(layer, visit)
        self._prefetch(pred_ids)
        return y

    # ---- pieces ---------------------------------------------------------------------------------------
    def _slots_tensor(self, slots: list[int], shape) -> torch.Tensor:
        t = torch.tensor(slots, dtype=torch.int32).view(shape)
        return t.to(self.device, non_blocking=True) if self.cuda else t

    def _split(self, flat: list[int], shape, preds) -> tuple[list[int], list[tuple[int, int]]]:
        n = shape[0] * shape[1]
        ids, rest = flat[:n], flat[n:]
        pred_keys = []
        for target, p in preds:
            m = p.numel()
            pred_keys += [(target, e) for e in dict.fromkeys(rest[:m])]
            self._predicted.setdefault(target, set()).update(rest[:m])
            rest = rest[m:]
        return ids, pred_keys

    def _score_prediction(self, layer: int, used: list[int]) -> None:
        if self.visits is not None:
            self.visits.append((layer, used))
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self._pred_hits += len(predicted.intersection(used))
            self._pred_total += len(predicted)
            self._pred_needed += len(used)

    def _copy_pools(self, loads: list[PoolLoad]) -> None:
        for name, pool in self.pools.items():
            self.transfer.copy(pool, [pl.load for pl in loads if pl.pool == name])

    def _prefetch(self, keys: list[tuple[int, int]]) -> None:
        if not keys or not self.transfer.link_idle():
            return  # predictions only use a link that would otherwise idle (never delay a demand copy)
        if self.mixed is not None:  # HOBBIT: low-precision copies, nearest layer first, deeper while cached
            by_layer: dict[int, list[int]] = {}
            for layer, e in keys:
                by_layer.setdefault(layer, []).append(e)
            pool_loads = adaptive_prefetch(self.mixed, list(by_layer.items()), self.now)
            self._copy_pools(pool_loads)
            ready = [(self.pools[pl.pool], pl.load) for pl in pool_loads]
        else:
            loads = self.state.prefetch(keys, self.now)
            self.transfer.copy(self.pool, loads)
            ready = [(self.pool, ld) for ld in loads]
        if self.cuda:
            for pool, ld in ready:
                self.pending.setdefault(ld.key[0], []).append(pool.ready[ld.slot])

    # ---- reporting ------------------------------------------------------------------------------------
    def report(self, tokens: int) -> dict:
        """Counters since the last `reset_stats()`; `tokens` normalises per-token figures."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        c = self.state.counters
        pc = self.low.state.counters if self.mixed is not None else c  # predictions go to the low pool (HOBBIT)
        accesses = c.hits + c.misses
        tokens = max(tokens, 1)
        stats = self.transfer.stats
        busy = stats.busy_seconds() if self.cuda else 0.0
        stall = stats.stall_seconds() if self.cuda else 0.0
        waits = sorted(self.routing_wait_s)
        return {
            "cache_slots": self.state.capacity, "host_pinned": self.store.pinned, "hits": c.hits, "misses": c.misses,
            "hit_rate": c.hits / accesses if accesses else 0.0, "misses_per_token": c.misses / tokens,
            "prefetches": pc.prefetches, "prefetch_hits": pc.prefetch_hits, "wasted_prefetches": pc.wasted_prefetches,
            "prefetch_precision": pc.prefetch_hits / pc.prefetches if pc.prefetches else 0.0,
            "predictor_precision": self._pred_hits / self._pred_total if self._pred_total else 0.0,
            "predictor_recall": self._pred_hits / self._pred_needed if self._pred_needed else 0.0,
            "bytes_copied": stats.bytes_copied, "bytes_per_token": stats.bytes_copied / tokens,
            "copy_busy_s": busy, "stall_ms_per_token": 1e3 * stall / tokens,
            "host_sync_ms_per_token": 1e3 * self.routing_wait_total_s / tokens,
            "routing_wait_us_p50": 1e6 * waits[len(waits) // 2] if waits else 0.0,
        } | (self._precision_report() if self.mixed is not None else {}) | (
            self.hybrid.report(tokens) if self.hybrid is not None else {})

    def _precision_report(self) -> dict:
        pairs = max(sum(self.pairs_served.values()), 1)
        return {"precision": self.precision_mode, "low_precision_bits": self.low.layout.bits,
                "thresholds": [self.thresholds.full, self.thresholds.low], "low_cache_slots": self.low.capacity,
                **{f"expert_{k}": v for k, v in self.mixed.counters.as_dict().items()},
                "miss_penalty": self.mixed.counters.miss_penalty(self.low.expert_bytes / self.expert_bytes),
                **{f"pairs_{k}_fraction": v / pairs for k, v in self.pairs_served.items()}}
