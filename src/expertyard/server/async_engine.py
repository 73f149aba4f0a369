"""One engine thread behind an asyncio front end.

The LLMEngine is not thread-safe, so one thread owns it: it runs commands sent by request handlers (encode,
add, abort, score) between steps, and calls `engine.step()` while any sequence is waiting or running. Requests
join and leave the batch at every step (the scheduler does the continuous batching). After each step the
thread hands every stream its new tokens through the event loop (one `call_soon_threadsafe` per step), into the
asyncio.Queue of the request that owns the stream. With nothing to do, the thread sleeps on its command queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from expertyard.engine.llm_engine import LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.sequence import Sequence
from expertyard.server.protocol import APIError

log = logging.getLogger("expertyard.server")


@dataclass
class Update:
    """What one stream got in one step: new tokens, and the whole output text so far."""

    index: int  # the stream's index within its request (choice index)
    token_ids: list[int]  # new output token ids
    logprobs: list[dict]  # their entries in Sequence.logprobs, when asked for
    text: str  # output text so far (trimmed at a stop string, EOS left out)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass
class Stream:
    """One sequence of one request; its updates go to the request's queue."""

    seq: Sequence
    index: int
    queue: asyncio.Queue
    seen: int = 0  # output tokens already published (engine thread only)
    created: float = field(default_factory=time.perf_counter)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[float, int], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # (seconds, sequences that got a token), called on the engine thread
        self.slow_step_s = 0.25  # steps slower than this are logged with their shape
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, Stream] = {}  # seq_id -> stream (engine thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- lifecycle (event loop thread) ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="expertyard-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is still in flight and end the engine thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put((None, None))
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the handlers' interface (event loop thread) ----------------------------------------------------
    async def call(self, fn: Callable):
        """Run fn() on the engine thread between steps; its exceptions are raised here."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        if (down := deployment_down(self.engine)) is not None:
            raise APIError(f"the deployment is down: {down}", status=503, code="deployment_down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return await asyncio.wrap_future(fut)

    async def add(self, requests: list[tuple[list[int], SamplingParams]]) -> tuple[list[Stream], asyncio.Queue]:
        """Admit all sequences of one request or none; their updates arrive on the returned queue."""
        q: asyncio.Queue = asyncio.Queue()

        def add_all() -> list[Stream]:
            streams = []
            try:
                for i, (ids, params) in enumerate(requests):
                    streams.append(Stream(self.engine.add_request(ids, params), i, q))
            except BaseException:
                for s in streams:
                    self.engine.abort(s.seq)
                raise
            for s in streams:
                self._streams[s.seq.seq_id] = s
            return streams

        return await self.call(add_all), q

    def abort(self, streams: list[Stream]) -> None:
        """Abort the unfinished ones (client gone); frees their KV rows before the next step. Non-blocking."""
        if streams and self.alive:
            self._commands.put((lambda: self._abort(streams), None))

    # ---- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            if not self._run_commands(block=not engine.has_unfinished()):
                break
            if not engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            try:
                out = engine.step()
            except Exception as e:  # a bug or an device error: fail what is in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - t0
            if seconds > self.slow_step_s:  # under load a slow step stalls every stream: say what it was
                st = engine.last_step
                log.warning("slow engine step: %.3f s for %d prefill tokens (%d prompts) + %d decodes", seconds,
                            sum(s.length for s in st.prefills), len(st.prefills), len(st.decodes))
            if self.on_step is not None:
                self.on_step(seconds, len(out))
            self._publish([self._update(s) for seq in out if (s := self._streams.get(seq.seq_id))])
        self._fail_all("the server is shutting down", reason="abort")

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands (waiting for one when idle); False once stop() was called."""
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return not self._stopping
        while True:
            fn, fut = item
            if fn is None:
                return False
            if fut is None:
                fn()
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 (handed to the waiting handler)
                    fut.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return not self._stopping

    def _update(self, s: Stream, error: str | None = None) -> tuple[asyncio.Queue, Update]:
        seq = s.seq
        out = seq.output_token_ids
        new, lps = out[s.seen:], seq.logprobs[s.seen:]
        s.seen = len(out)
        if seq.finished:
            del self._streams[seq.seq_id]
        return s.queue, Update(s.index, new, lps, seq.text, seq.finish_reason, seq.num_prompt_tokens, len(out), error)

    def _abort(self, streams: list[Stream]) -> None:
        for s in streams:
            if not s.seq.finished:
                self.engine.abort(s.seq)
            self._streams.pop(s.seq.seq_id, None)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        updates = []
        for s in list(self._streams.values()):
            self.engine.abort(s.seq)
            s.seq.finish_reason = reason
            updates.append(self._update(s, error=message))
        # sequences whose stream is gone (aborted): make sure none is left holding a KV row
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq)
        self._publish(updates)

    def _publish(self, updates: list[tuple[asyncio.Queue, Update]]) -> None:
        if not updates:
            return
        try:
            self._loop.call_soon_threadsafe(_deliver, updates)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def deployment_down(engine: LLMEngine) -> str | None:
    """Why a distributed deployment cannot serve (a rank died or timed out), or None (docs/disaggregation.md)."""
    return getattr(engine.runner, "down_reason", None)


def _deliver(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for q, u in items:
        q.put_nowait(u)
