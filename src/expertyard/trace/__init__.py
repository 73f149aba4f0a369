"""Routing traces: the file format, recording them from the engine, and replaying them through the expert cache."""

from expertyard.trace.format import Trace, TraceError, load_trace, save_trace

__all__ = ["Trace", "TraceError", "load_trace", "save_trace"]
