"""Keep Python's garbage collector's full collections short while serving.

A full (generation 2) collection scans every object the collector tracks, and after start-up (torch,
transformers, the model, the engine) that is a few hundred thousand: 180-260 ms per collection on each rank of
a 4 x H200 deployment (`EXPERTYARD_STEP_TIMES`, 2026-11-22, docs/benchmarks/results/disagg/session7/run5_*.txt,
start-up's collections). A long-running server meets such collections now and then, and each stops the rank's
host for that long; in a deployment every rank then waits for it. `freeze_long_lived` moves everything alive at
the end of start-up into the permanent generation (vLLM does the same), so later full collections scan only what
serving creates (tests/test_collector.py checks a full collection gets over 5x shorter with 200,000 frozen
containers). Call it once the start-up objects are final: anything frozen that later becomes cyclic garbage is
never freed (so not before a runner or cache is swapped out). At exit the frozen objects are handed back to the
collector, so that interpreter shutdown frees them as usual (extensions that check for leaks at shutdown, such
as triton's nanobind bindings, would otherwise print pages of "leaked instance" lines after every command).
"""

from __future__ import annotations

import atexit
import gc


def freeze_long_lived() -> None:
    """Collect what start-up left behind, then exempt every surviving object from later collections."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # registered once, however often start-up freezes
    atexit.register(gc.unfreeze)
