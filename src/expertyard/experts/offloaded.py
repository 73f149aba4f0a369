"""Experts in host memory behind a GPU expert cache, with pre-gated prefetch on a dedicated copy stream.

A MoE layer visit on CUDA (the decode path, when one visit's experts fit the cache):
  1. the predictor scores the next layers' experts from x (one stacked matmul, on the GPU);
  2. routing and predictions go to a pinned host buffer (async copy + event);
  3. the expert FFN is launched at once over the *resident* experts: a device table maps expert -> slot, and
     pairs whose expert is not resident map to -1 and are skipped by the kernel;
  4. the host waits for the routing event (the one host sync of the layer: the GPU keeps computing step 3
     meanwhile), asks the cache bookkeeping which experts missed, copies them on the copy stream, and adds a
     second FFN pass over just the missed pairs once their copies land (the compute stream waits only on those
     copies' events); on the hit path that pass does not exist;
  5. predicted experts that are not resident are copied next, protected until their layer runs.
A slot is only overwritten after the last kernel that read it (one event per slot), and a kernel reading a
prefetched slot waits for that slot's copy. On the CPU, and for visits that need more experts than the cache
holds (long prefills), experts are loaded first and computed in groups that fit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError
from expertyard.experts.backend import ExpertBackend, Projection
from expertyard.experts.cache_state import CacheCounters, ExpertCacheState, Load
from expertyard.experts.host_store import HostExpertStore
from expertyard.experts.mixed_cache import (HIGH_POOL, LOW_POOL, MixedPrecisionCache, PoolLoad, PrecisionCounters,
                                            adaptive_prefetch)
from expertyard.experts.policies import CachePolicy
from expertyard.experts.precision import FULL, LOW, SKIP, PrecisionThresholds, pair_plan
from expertyard.experts.predictors.base import NoPredictor, Predictor
from expertyard.experts.telemetry import Timeline, TransferStats
from expertyard.kernels.fused_moe import fused_moe
from expertyard.quant.ffn import fused_moe_quantized
from expertyard.quant.packed_expert import dequantize_expert, new_pool

# T = tokens, K = experts per token, S = cache slots, E = experts per layer, D = hidden, I = expert intermediate


class OffloadedExperts(ExpertBackend):
    graph_safe = False  # the host learns each layer's routing: decode runs in per-layer graph pieces
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 host_budget_bytes: int | None = None):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.num_experts = cfg.moe.num_experts
        self.keys = [(layer, e) for layer in cfg.moe_layers for e in range(self.num_experts)]
        self.store = HostExpertStore(self.keys, cfg.hidden_size, cfg.moe.intermediate_size, dtype,
                                     host_budget_bytes, pin=self.device.type == "cuda")
        self.expert_bytes = self.store.expert_bytes
        self.state: ExpertCacheState | None = None
        self.predictor: Predictor = NoPredictor()
        self.stats = TransferStats()
        self.timeline: Timeline | None = None

    # ---- loading (called by the checkpoint loader) ------------------------------------------------------
    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        self.store.put((layer, expert), proj, tensor)

    def wants_disk(self, layer: int, expert: int) -> bool:
        return not self.store.in_memory((layer, expert))

    def load_expert_from_disk(self, layer: int, expert: int, proj: Projection, path: Path, name: str) -> None:
        self.store.put_on_disk((layer, expert), proj, path, name)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return {(l, e, p) for l, e in self.keys for p in ("gate", "up", "down")}

    # ---- set-up ---------------------------------------------------------------------------------------
    def configure(self, num_slots: int, policy: CachePolicy, predictor: Predictor | None = None,
                  timeline: bool = False) -> None:
        """Allocate the GPU slot pool once (no allocation per step) and choose policy and predictor."""
        if num_slots < self.cfg.moe.top_k:
            raise ConfigError(f"an expert cache of {num_slots} slots cannot hold the {self.cfg.moe.top_k} experts "
                              "of one token")
        s, i, d = num_slots, self.cfg.moe.intermediate_size, self.cfg.hidden_size
        self.pool = torch.zeros(s, 3 * i * d, dtype=self.dtype, device=self.device)  # [S, 3*I*D]; zeros: never NaN
        self.w13 = self.pool[:, :2 * i * d].view(s, 2 * i, d)  # [S, 2I, D]
        self.w2 = self.pool[:, 2 * i * d:].view(s, d, i)  # [S, D, I]
        self.state = ExpertCacheState(num_slots, policy)
        self.mixed: MixedPrecisionCache | None = None  # set by configure_low_precision
        self.predictor = predictor or NoPredictor()
        self.slot_table = self._new_table()  # [L, E]: slot of each resident expert, else -1
        self.tables = {HIGH_POOL: self.slot_table}
        self.dest = {HIGH_POOL: self.pool}
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready: dict[tuple[str, int], torch.cuda.Event] = {}  # (pool, slot) -> its last copy done
            self.last_read: dict[tuple[str, int], torch.cuda.Event] = {}  # (pool, slot) -> last kernel reading it
            self.pending: dict[int, list[torch.cuda.Event]] = {}  # layer -> copies of its prefetched experts
            self.host_buf = torch.empty(1 << 16, dtype=torch.int32, pin_memory=True)
            self.timeline = Timeline() if timeline else None
        self.now = 0
        self.visits: list[tuple[int, list[int]]] | None = None  # set to [] to record every visit's experts
        self.reset_stats()

    def _new_table(self) -> torch.Tensor:
        return torch.full((self.cfg.num_layers, self.num_experts), -1, dtype=torch.int32, device=self.device)

    def configure_low_precision(self, low_store, low_slots: int, low_policy: CachePolicy, mode: str = "mixed",
                                thresholds: PrecisionThresholds | None = None) -> None:
        """Add a low-precision slot pool (after `configure`, whose slots become the full-precision pool).
        mode "mixed": token-level precision on a miss (HOBBIT); "low": every pair accepts the low copy (quality
        baselines: all-int8/int4/int2)."""
        if mode not in ("mixed", "low"):
            raise ConfigError(f"precision mode {mode!r}: choose mixed or low (full needs no low-precision pool)")
        if low_slots < self.cfg.moe.top_k:
            raise ConfigError(f"a low-precision pool of {low_slots} slots cannot hold the {self.cfg.moe.top_k} "
                              "experts of one token; give the expert cache more memory")
        self.low_store, self.low_layout = low_store, low_store.layout
        self.low_pool = new_pool(low_slots, self.low_layout, self.device)  # [S_low, nbytes] uint8
        self.low_table = self._new_table()
        self.tables[LOW_POOL], self.dest[LOW_POOL] = self.low_table, self.low_pool
        if not self.cuda:  # CPU: dequantize once per load, not per visit (what the GPU kernel does in registers)
            i, d = self.cfg.moe.intermediate_size, self.cfg.hidden_size
            self.low_w13 = torch.zeros(low_slots, 2 * i, d, dtype=self.dtype)  # [S_low, 2I, D]
            self.low_w2 = torch.zeros(low_slots, d, i, dtype=self.dtype)  # [S_low, D, I]
        self.mixed = MixedPrecisionCache(self.state.capacity, self.state.policy, low_slots, low_policy)
        self.state = self.mixed.high  # the full-precision path (visits too large for the pools) uses this pool
        self.precision_mode = mode
        self.thresholds = thresholds or PrecisionThresholds()
        self.reset_stats()

    def on_sequence_start(self) -> None:
        for state in (self.mixed.high, self.mixed.low) if self.mixed else (self.state,):
            state.policy.on_sequence_start()

    def reset_stats(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.state.counters = CacheCounters()
        if self.mixed is not None:
            self.mixed.low.counters = CacheCounters()
            self.mixed.counters = PrecisionCounters()
        self.pairs_served = {"full": 0, "low": 0, "skipped": 0}  # (token, expert) pairs of mixed-precision visits
        self.stats = TransferStats()
        self._predicted: dict[int, set[int]] = {}
        self._pred_hits = self._pred_total = self._pred_needed = 0

    # ---- the seam -------------------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(layer, x, topk_ids, topk_w, self.predictor.predict(layer, x))

    def forward_routed(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                       preds: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """`forward` with the predictions already made (piecewise CUDA graphs compute them in the graph)."""
        fits = topk_ids.numel() <= self.state.capacity
        if self.mixed is not None and topk_ids.numel() <= min(self.mixed.high.capacity, self.mixed.low.capacity):
            y = self._forward_mixed(layer, x, topk_ids, topk_w, preds)
        elif self.cuda and fits:
            y = self._forward_speculative(layer, x, topk_ids, topk_w, preds)
        else:
            y = self._forward_loaded_first(layer, x, topk_ids, topk_w, preds)
        self.now += 1
        return y

    def _routing_to_host(self, topk_ids: torch.Tensor, preds) -> tuple[torch.cuda.Event, int]:
        """Start copying routing and predictions (int32) to the pinned host buffer; (event, count)."""
        flat = torch.cat([topk_ids.reshape(-1)] + [p.reshape(-1) for _, p in preds]).to(torch.int32)
        n = flat.numel()
        if n > self.host_buf.numel():
            self.host_buf = torch.empty(2 * n, dtype=torch.int32, pin_memory=True)
        self.host_buf[:n].copy_(flat, non_blocking=True)
        routed = torch.cuda.Event()
        routed.record()
        return routed, n

    def _forward_speculative(self, layer, x, topk_ids, topk_w, preds):
        compute = torch.cuda.current_stream(self.device)
        self._wait(compute, self.pending.pop(layer, []))
        routed, n = self._routing_to_host(topk_ids, preds)
        slots = self.slot_table[layer][topk_ids]  # [T, K]: -1 where not resident (skipped by the kernel)
        y = self._ffn(x, slots, topk_w, f"moe L{layer}", compute)
        t0 = time.perf_counter()
        routed.synchronize()  # the layer's one host sync; the kernel above keeps the GPU busy meanwhile
        self.stats.host_sync_s += time.perf_counter() - t0
        flat = self.host_buf[:n].tolist()
        ids, pred_ids = self._split(flat, topk_ids.shape, preds)
        used = list(dict.fromkeys(ids))
        self._score_prediction(layer, used)
        loads = self.state.access(layer, used, self.now)
        if loads:
            self._copy(loads)
            self._wait(compute, [self.ready[(HIGH_POOL, ld.slot)] for ld in loads])
            missed = {ld.key[1]: ld.slot for ld in loads}
            miss_slots = torch.tensor([missed.get(e, -1) for e in ids], dtype=torch.int32)
            miss_slots = miss_slots.view(topk_ids.shape).to(self.device, non_blocking=True)
            y = y + self._ffn(x, miss_slots, topk_w, f"moe miss L{layer}", compute)
        self._mark_read(compute, used, layer)
        self.state.end_visit(layer, used)  # first, so that a prediction may replace what this layer just used
        self._prefetch(pred_ids)
        return y

    def _forward_loaded_first(self, layer, x, topk_ids, topk_w, preds):
        """Learn the routing, then load and compute in groups of experts that fit the cache."""
        if self.cuda:
            routed, n = self._routing_to_host(topk_ids, preds)
            routed.synchronize()
            flat = self.host_buf[:n].tolist()
        else:
            flat = torch.cat([topk_ids.reshape(-1)] + [p.reshape(-1) for _, p in preds]).tolist()
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
            self._copy(loads)
            if self.cuda:
                self._wait(compute, [self.ready[(HIGH_POOL, ld.slot)] for ld in loads])
            slot_of = {e: self.state.slot_of((layer, e)) for e in group}
            part = self._ffn_group(x, ids, slot_of, topk_ids.shape, topk_w, f"moe L{layer}", compute)
            y = part if y is None else y + part
            if self.cuda:
                self._mark_read(compute, group, layer)
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
            self._wait(compute, self.pending.pop(layer, []))
        force = LOW if self.precision_mode == "low" else None
        plan = pair_plan(topk_ids, topk_w, self.slot_table[layer], self.low_table[layer], self.thresholds, force)
        y = (self._ffn_pool(x, plan.high_slots, plan.weights, HIGH_POOL, f"moe L{layer}", compute)
             + self._ffn_pool(x, plan.low_slots, plan.weights, LOW_POOL, f"moe low L{layer}", compute))
        routing = torch.cat([topk_ids.reshape(-1).to(torch.int32), plan.level.reshape(-1)])
        if self.cuda:
            routed, n = self._routing_to_host(routing.view(2, -1), preds)
            t0 = time.perf_counter()
            routed.synchronize()  # the layer's one host sync; the kernels above keep the GPU busy meanwhile
            self.stats.host_sync_s += time.perf_counter() - t0
            flat = self.host_buf[:n].tolist()
        else:
            flat = torch.cat([routing] + [p.reshape(-1).to(torch.int32) for _, p in preds]).tolist()
        pairs = topk_ids.numel()
        ids, level = flat[:pairs], flat[pairs:2 * pairs]
        _, pred_ids = self._split(flat[pairs:], (1, pairs), preds)  # skip the levels, keep the predictions
        self._score_prediction(layer, list(dict.fromkeys(ids)))
        visit = self.mixed.access(layer, list(zip(ids, level)), self.now)
        for kind, n in visit.pairs_served.items():
            self.pairs_served[kind] += n
        self._copy_pools(visit.loads)
        if visit.missed_pairs:
            if self.cuda:
                self._wait(compute, [self.ready[(pl.pool, pl.load.slot)] for pl in visit.loads])
            slots = {HIGH_POOL: [-1] * pairs, LOW_POOL: [-1] * pairs}
            for p in visit.missed_pairs:
                pool, slot = visit.miss_source[ids[p]]
                slots[pool][p] = slot
            for pool, name in ((HIGH_POOL, f"moe miss L{layer}"), (LOW_POOL, f"moe low miss L{layer}")):
                if any(s >= 0 for s in slots[pool]):
                    t = torch.tensor(slots[pool], dtype=torch.int32).view(topk_ids.shape)
                    y = y + self._ffn_pool(x, t.to(self.device, non_blocking=True), plan.weights, pool, name, compute)
        if self.cuda:
            self._mark_read(compute, visit.high_used, layer, HIGH_POOL)
            self._mark_read(compute, visit.low_used, layer, LOW_POOL)
        self.mixed.end_visit(layer, visit)
        self._prefetch(pred_ids)
        return y

    def _ffn_pool(self, x, slots, weights, pool, name, stream):
        """FFN over the pairs with a slot (>= 0) in `pool`; -1 pairs contribute nothing."""
        if not self.cuda:  # the CPU kernel wants valid ids: slot -1 becomes weight 0
            w13, w2 = (self.w13, self.w2) if pool == HIGH_POOL else (self.low_w13, self.low_w2)
            return fused_moe(x, w13, w2, slots.clamp(min=0), weights * (slots >= 0))
        if pool == HIGH_POOL:
            return self._ffn(x, slots, weights, name, stream)
        if self.timeline is not None and self.cuda:
            with self.timeline.span(name, "compute", stream):
                return fused_moe_quantized(x, self.low_pool, self.low_layout, slots, weights)
        return fused_moe_quantized(x, self.low_pool, self.low_layout, slots, weights)

    # ---- pieces ---------------------------------------------------------------------------------------
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

    def _ffn(self, x, slots, topk_w, name, stream):
        if self.timeline is not None:
            with self.timeline.span(name, "compute", stream):
                return fused_moe(x, self.w13, self.w2, slots, topk_w)
        return fused_moe(x, self.w13, self.w2, slots, topk_w)

    def _ffn_group(self, x, ids, slot_of, shape, topk_w, name, stream):
        """FFN over the pairs whose expert is in `slot_of`; the others contribute nothing."""
        slots = torch.tensor([slot_of.get(e, -1) for e in ids], dtype=torch.int32).view(shape)
        return self._ffn_pool(x, slots.to(self.device, non_blocking=True), topk_w, HIGH_POOL, name, stream)

    def _copy(self, loads: list[Load], pool: str = HIGH_POOL) -> None:
        """Copy each loaded expert into its slot of `pool`: on the copy stream after the slot's last reader
        (CUDA)."""
        if loads:
            self._set_table(loads, pool)
        dest = self.dest[pool]
        for ld in loads:
            if pool == HIGH_POOL:
                src, nbytes = self.store.source(ld.key, self.device), self.expert_bytes
            else:
                src, nbytes = self.low_store.source(ld.key), self.low_layout.nbytes
            self.stats.copies += 1
            self.stats.bytes_copied += nbytes
            if not self.cuda:
                dest[ld.slot].copy_(src)
                if pool == LOW_POOL:
                    w13, w2 = dequantize_expert(src, self.low_layout, self.dtype)
                    self.low_w13[ld.slot].copy_(w13), self.low_w2[ld.slot].copy_(w2)
                continue
            stream, where = self.copy_stream, (pool, ld.slot)
            if where in self.last_read:
                stream.wait_event(self.last_read.pop(where))
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            with torch.cuda.stream(stream):
                dest[ld.slot].copy_(src, non_blocking=True)
            done.record(stream)
            self.ready[where] = done
            self.stats.copy_events.append((start, done))
            if self.timeline is not None:
                kind = ("prefetch" if ld.prefetch else "miss") + ("" if pool == HIGH_POOL else f" {pool}")
                self.timeline.spans.append((f"{kind} L{ld.key[0]} E{ld.key[1]}", "copy", start, done))
            if pool == HIGH_POOL and not self.store.in_memory(ld.key):
                self.store.mark_staging_read(src, done)

    def _copy_pools(self, loads: list[PoolLoad]) -> None:
        for pool in (HIGH_POOL, LOW_POOL):
            self._copy([pl.load for pl in loads if pl.pool == pool], pool)

    def _set_table(self, loads: list[Load], pool: str = HIGH_POOL) -> None:
        """Mirror residency changes into the pool's device table, in compute-stream order."""
        rows, cols, vals = [], [], []
        for ld in loads:
            if ld.evicted is not None:
                rows.append(ld.evicted[0]), cols.append(ld.evicted[1]), vals.append(-1)
            rows.append(ld.key[0]), cols.append(ld.key[1]), vals.append(ld.slot)
        idx = torch.tensor([rows, cols, vals], dtype=torch.long)
        if self.cuda:
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        self.tables[pool][idx[0], idx[1]] = idx[2].to(torch.int32)

    def _prefetch(self, keys: list[tuple[int, int]]) -> None:
        if not keys:
            return
        if self.mixed is not None:  # HOBBIT: low-precision copies, nearest layer first, deeper while cached
            by_layer: dict[int, list[int]] = {}
            for layer, e in keys:
                by_layer.setdefault(layer, []).append(e)
            pool_loads = adaptive_prefetch(self.mixed, list(by_layer.items()), self.now)
            self._copy_pools(pool_loads)
            ready = [((pl.pool, pl.load.slot), pl.load.key[0]) for pl in pool_loads]
        else:
            loads = self.state.prefetch(keys, self.now)
            self._copy(loads)
            ready = [((HIGH_POOL, ld.slot), ld.key[0]) for ld in loads]
        if self.cuda:
            for where, layer in ready:
                self.pending.setdefault(layer, []).append(self.ready[where])

    def _wait(self, stream, events: list) -> None:
        if not events:
            return
        before = torch.cuda.Event(enable_timing=True)
        before.record(stream)
        for ev in events:
            stream.wait_event(ev)
        after = torch.cuda.Event(enable_timing=True)
        after.record(stream)
        self.stats.stall_events.append((before, after))

    def _mark_read(self, stream, used: list[int], layer: int, pool: str = HIGH_POOL) -> None:
        done = torch.cuda.Event()
        done.record(stream)
        state = self.state if pool == HIGH_POOL else self.mixed.low
        for e in used:
            slot = state.slot_of((layer, e))
            if slot is not None:
                self.last_read[(pool, slot)] = done

    # ---- reporting ------------------------------------------------------------------------------------
    def report(self, tokens: int) -> dict:
        """Counters since configure(); `tokens` normalises per-token figures."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        c = self.state.counters
        pc = self.mixed.low.counters if self.mixed is not None else c  # predictions go to the low pool (HOBBIT)
        accesses = c.hits + c.misses
        tokens = max(tokens, 1)
        busy = self.stats.busy_seconds() if self.cuda else 0.0
        stall = self.stats.stall_seconds() if self.cuda else 0.0
        return {
            "cache_slots": self.state.capacity, "host_pinned": self.store.pinned, "hits": c.hits, "misses": c.misses,
            "hit_rate": c.hits / accesses if accesses else 0.0, "misses_per_token": c.misses / tokens,
            "prefetches": pc.prefetches, "prefetch_hits": pc.prefetch_hits, "wasted_prefetches": pc.wasted_prefetches,
            "prefetch_precision": pc.prefetch_hits / pc.prefetches if pc.prefetches else 0.0,
            "predictor_precision": self._pred_hits / self._pred_total if self._pred_total else 0.0,
            "predictor_recall": self._pred_hits / self._pred_needed if self._pred_needed else 0.0,
            "bytes_copied": self.stats.bytes_copied, "bytes_per_token": self.stats.bytes_copied / tokens,
            "copy_busy_s": busy, "stall_ms_per_token": 1e3 * stall / tokens,
            "host_sync_ms_per_token": 1e3 * self.stats.host_sync_s / tokens,
        } | (self._precision_report() if self.mixed is not None else {})

    def _precision_report(self) -> dict:
        pairs = max(sum(self.pairs_served.values()), 1)
        return {"precision": self.precision_mode, "low_precision_bits": self.low_layout.bits,
                "thresholds": [self.thresholds.full, self.thresholds.low], "low_cache_slots": self.mixed.low.capacity,
                **{f"expert_{k}": v for k, v in self.mixed.counters.as_dict().items()},
                "miss_penalty": self.mixed.counters.miss_penalty(self.low_layout.nbytes / self.expert_bytes),
                **{f"pairs_{k}_fraction": v / pairs for k, v in self.pairs_served.items()}}
