"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from expertyard.engine.llm_engine import LLMEngine

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.requests = Counter("expertyard_requests", "Finished requests", ["model_name", "endpoint", "finish_reason"],
                                registry=r)
        self.errors = Counter("expertyard_request_errors", "Requests answered with an error",
                              ["model_name", "status"], registry=r)
        self.prompt_tokens = Counter("expertyard_prompt_tokens", "Prompt tokens admitted", ["model_name"],
                                     registry=r).labels(**labels)
        self.generation_tokens = Counter("expertyard_generation_tokens", "Tokens generated", ["model_name"],
                                         registry=r).labels(**labels)
        self.ttft = Histogram("expertyard_time_to_first_token_seconds", "Request arrival to first token",
                              ["model_name"], buckets=_LATENCY, registry=r).labels(**labels)
        self.tpot = Histogram("expertyard_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request", ["model_name"],
                              buckets=_LATENCY, registry=r).labels(**labels)
        self.e2e = Histogram("expertyard_e2e_request_latency_seconds", "Request arrival to last token",
                             ["model_name"], buckets=_LATENCY, registry=r).labels(**labels)
        self.step = Histogram("expertyard_engine_step_seconds", "Duration of one engine step", ["model_name"],
                              buckets=_LATENCY, registry=r).labels(**labels)
        self.model_name = model_name
        r.register(_EngineCollector(engine, model_name))

    def on_step(self, seconds: float, sampled: int) -> None:
        """Called by the engine thread after every step."""
        self.step.observe(seconds)
        self.generation_tokens.inc(sampled)

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Read at scrape time: running and waiting sequences, and the expert cache of an offloaded backend."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.labels = engine, [model_name]

    def describe(self):
        return []

    def collect(self):
        sched = self.engine.scheduler
        for name, value, doc in (("running", len(sched.running), "Sequences in the running batch (KV rows held)"),
                                 ("waiting", len(sched.waiting), "Sequences waiting for a KV row")):
            g = GaugeMetricFamily(f"expertyard_num_requests_{name}", doc, labels=["model_name"])
            g.add_metric(self.labels, value)
            yield g
        experts = self.engine.model.experts
        state = getattr(experts, "state", None)
        if state is None:  # resident experts: no cache
            return
        c, stats = state.counters, getattr(experts, "stats", None)
        values = [("hits", c.hits, "Expert cache hits"), ("misses", c.misses, "Expert cache misses"),
                  ("prefetches", c.prefetches, "Experts loaded ahead of use by a prediction")]
        if stats is not None:
            values.append(("bytes_copied", stats.bytes_copied, "Bytes copied host -> device for experts"))
        for name, value, doc in values:
            m = CounterMetricFamily(f"expertyard_expert_cache_{name}", doc, labels=["model_name"])
            m.add_metric(self.labels, value)
            yield m
        g = GaugeMetricFamily("expertyard_expert_cache_slots", "Experts the device cache holds", labels=["model_name"])
        g.add_metric(self.labels, state.capacity)
        yield g
