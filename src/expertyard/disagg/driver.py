"""Who drives a step: attention rank 0 runs the engine (scheduler, sampler) with a `DistributedRunner` in place
of its model runner; every other rank follows the step headers that rank 0 broadcasts.

Per step, rank 0 plans the step (step_plan.py), broadcasts the header over the CPU group, runs its own
micro-batches, receives the other attention ranks' final hidden states and computes the logits. All attention
ranks step in lockstep (possibly with zero tokens), so the expert ranks loop layer by layer. While the engine
is idle, a heartbeat header every dist_timeout / 4 keeps the followers' waits short of the timeout.
"""

from __future__ import annotations

import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.profiler import record_function

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.decode_pieces import DecodePieces
from expertyard.disagg.groups import Groups
from expertyard.disagg.pingpong import run_micro_batches
from expertyard.disagg.step_plan import StepHeader, plan_step
from expertyard.engine.step_profiler import StepProfiler
from expertyard.disagg.transport import Exchanger
from expertyard.engine.host_ints import long_tensor
from expertyard.engine.scheduler import ScheduledStep
from expertyard.engine.step_timer import STEP_TIMER
from expertyard.errors import DeploymentDownError
from expertyard.models.base import CausalLM

# N = output rows of a step, D = hidden, V = vocabulary


def broadcast_header(header: StepHeader | None, groups: Groups) -> StepHeader:
    box = [header]
    try:
        dist.broadcast_object_list(box, src=0, group=groups.control)
    except Exception as e:  # noqa: BLE001
        raise DeploymentDownError(f"rank {dist.get_rank()}: the step header broadcast failed: a rank died or "
                                  f"timed out ({type(e).__name__}: {e})") from e
    return box[0]


class AttentionRank:
    """What an attention rank runs per step: its micro-batches, then its hidden states to rank 0."""

    def __init__(self, model: CausalLM, kv_cache, exchange, groups: Groups, cfg: DisaggConfig, device: torch.device,
                 pieces: DecodePieces | None = None):
        self.model, self.kv_cache, self.exchange, self.cfg, self.device = model, kv_cache, exchange, cfg, device
        self.pieces = pieces  # decode steps from CUDA graphs (None: always the eager loop)
        self.results = Exchanger(groups.results, device, "sending hidden states to rank 0")
        self.rank = dist.get_rank()
        self._last_send = None

    def run(self, header: StepHeader, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's micro-batches; `prev_tokens` [header.prev_tokens]: what the placeholders resolve to."""
        self.exchange.capacity = header.capacity
        plans = header.plans[self.rank]
        if header.graphs:
            return self.pieces.run(plans, header.capacity, header.decode_len, prev_tokens)
        return run_micro_batches(self.model, self.kv_cache, plans, self.exchange, self.device, prev_tokens)

    def follow(self, header: StepHeader) -> None:
        prev_tokens = None
        if header.prev_tokens:  # the sampled tokens of the step before, from rank 0 (on the device)
            prev_tokens = torch.empty(header.prev_tokens, dtype=torch.long, device=self.device)
            self.results.p2p([], [(0, prev_tokens)]).wait()
        hidden = self.run(header, prev_tokens)  # [n, D]
        if self._last_send is not None:
            self._last_send.wait()
        self._last_send = self.results.p2p([(0, hidden)], []) if hidden.shape[0] else None


class DistributedRunner:
    """Stands in for `ModelRunner` on rank 0: same `run(step, all_logits)` contract."""

    def __init__(self, attention: AttentionRank, groups: Groups, cfg: DisaggConfig, max_num_seqs: int):
        self.attention, self.groups, self.cfg, self.max_num_seqs = attention, groups, cfg, max_num_seqs
        self.kv_cache = attention.kv_cache
        self.graphs = None
        self.down_reason: str | None = None
        self.micro_batches = cfg.micro_batches  # may be changed between steps (benchmarks sweep it)
        self._lock = threading.Lock()
        self._last_header = time.monotonic()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="expertyard-heartbeat", daemon=True)
        self._heartbeat.start()
        self._profiler = StepProfiler(0, "attention, driver")
        STEP_TIMER.label = "rank 0 (attention, driver)"
        self._tokens_sent = None  # the send of sampled tokens to the other attention ranks in progress

    def _broadcast(self, header: StepHeader) -> None:
        if self.down_reason is not None:
            raise DeploymentDownError(self.down_reason)
        try:
            broadcast_header(header, self.groups)
        except DeploymentDownError as e:
            self.down_reason = str(e)
            raise
        self._last_header = time.monotonic()

    def _beat(self) -> None:
        period = self.cfg.dist_timeout / 4
        while not self._stop.wait(min(period, 1.0)):
            with self._lock:
                if self.down_reason is None and time.monotonic() - self._last_header >= period:
                    try:
                        self._broadcast(StepHeader("idle"))
                    except DeploymentDownError as e:
                        print(f"expertyard: deployment down: {e}", file=sys.stderr, flush=True)

    @torch.inference_mode()
    def run(self, step: ScheduledStep, all_logits: bool = False,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] float32 in step order (see ModelRunner.run)."""
        self._profiler.step()
        with record_function("expertyard.plan"):
            header, gather = plan_step(step, self.cfg, self.max_num_seqs, all_logits, self.micro_batches,
                                       graphs=self.attention.pieces is not None)
            header.prev_tokens = 0 if prev_tokens is None else len(prev_tokens)
            counts = [sum(len(mb.out_rows) for mb in plans) for plans in header.plans]
            index = long_tensor(gather, self.attention.device)  # [N]
        STEP_TIMER.mark("plan")
        with self._lock:
            with record_function("expertyard.broadcast"):
                self._broadcast(header)
            STEP_TIMER.mark("broadcast")
            begin = self._device_event()
            try:
                if header.prev_tokens and len(header.plans) > 1:
                    self._send_tokens(prev_tokens, len(header.plans))
                with record_function("expertyard.layers"):
                    own = self.attention.run(header, prev_tokens)  # [n_0, D]
                STEP_TIMER.mark("layers (enqueue)")
                with record_function("expertyard.gather"):
                    hidden = self._gather(counts, own).index_select(0, index)  # [N, D]
            except DeploymentDownError as e:
                self.down_reason = str(e)
                raise
        logits = self.attention.model.compute_logits(hidden)  # [N, V]
        if begin is not None:
            STEP_TIMER.device_span(begin, self._device_event())
        return logits

    def _device_event(self) -> torch.cuda.Event | None:
        if not (STEP_TIMER.enabled and self.attention.device.type == "cuda"):
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _send_tokens(self, tokens: torch.Tensor, attention_ranks: int) -> None:
        """The in-flight step's sampled tokens [N] to every other attention rank (the placeholders of theirs)."""
        if self._tokens_sent is not None:
            self._tokens_sent.wait()  # the previous step's send (a stream wait on CUDA)
        self._tokens_sent = self.attention.results.p2p([(r, tokens) for r in range(1, attention_ranks)], [])

    def _gather(self, counts: list[int], own: torch.Tensor) -> torch.Tensor:
        """Rank 0's rows, then each other attention rank's (sizes known from the plan): [sum(counts), D]."""
        parts = [own] + [torch.empty(n, own.shape[1], dtype=own.dtype, device=own.device) for n in counts[1:]]
        self.attention.results.p2p([], [(r, parts[r]) for r in range(1, len(counts)) if counts[r]]).wait()
        return torch.cat(parts)

    def shutdown(self) -> None:
        """Tell every rank to leave its loop (no-op once the deployment is down)."""
        self._stop.set()
        with self._lock:
            if self.down_reason is None:
                try:
                    self._broadcast(StepHeader("stop"))
                except DeploymentDownError:
                    pass


def follow(groups: Groups, attention: AttentionRank | None, expert_worker) -> None:
    """The loop of every rank but 0: run each step's share until rank 0 says stop."""
    role = "attention" if attention is not None else "expert"
    profiler = StepProfiler(dist.get_rank(), role)
    STEP_TIMER.label = f"rank {dist.get_rank()} ({role})"
    while True:
        STEP_TIMER.start()
        with record_function("expertyard.header_wait"):
            header = broadcast_header(None, groups)
        if header.command == "stop":
            return
        if header.command != "step":
            continue
        STEP_TIMER.kind_of_step("decode" if header.graphs else "prefill, mixed or eager")
        STEP_TIMER.mark("header wait")  # includes waiting for rank 0 to plan and send it
        profiler.step()
        with record_function("expertyard.layers"):
            if attention is not None:
                attention.follow(header)
            else:
                expert_worker.run_step(header.capacity, header.micro_batches, header.graphs)
        STEP_TIMER.mark("layers (enqueue)")
