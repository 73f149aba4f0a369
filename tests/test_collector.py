"""engine/collector.py: start-up objects leave the garbage collector's scans; the entry points freeze them."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

from expertyard.engine.collector import freeze_long_lived


def _full_collection_s() -> float:
    t = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t


def test_frozen_objects_are_not_scanned_and_later_ones_are():
    long_lived = [[i] for i in range(200_000)]  # tracked containers, like the modules and configs of start-up
    before = _full_collection_s()
    freeze_long_lived()
    assert gc.get_freeze_count() >= len(long_lived)
    assert not gc.is_finalized(long_lived) and long_lived[0] == [0]
    after = _full_collection_s()
    assert after < before / 5, f"full collection {after * 1e3:.1f} ms after freezing vs {before * 1e3:.1f} ms before"
    cycle = []
    cycle.append(cycle)  # garbage made after the freeze is still collected
    del cycle
    assert gc.collect() >= 1


def test_generate_freezes_after_start_up(capsys):
    from expertyard.entrypoints.cli import main

    gc.unfreeze()
    assert main(["generate", "--prompt", "Once upon a time", "--max-tokens", "4", "--device", "cpu"]) == 0
    assert gc.get_freeze_count() > 10_000  # torch, transformers and the model, at least


def test_frozen_cycles_are_freed_at_exit():
    """Shutdown frees what start-up froze (the cycle's finalizer runs), as it would have without the freeze."""
    code = ("from expertyard.engine.collector import freeze_long_lived\n"
            "class Node:\n"
            "    def __del__(self): print('freed', flush=True)\n"
            "a = Node(); a.self = a; del a\n"  # cyclic garbage made before the freeze: collected by it
            "b = Node(); b.self = b\n"
            "freeze_long_lived(); freeze_long_lived()\n"
            "del b\n")  # garbage inside the permanent generation: only shutdown can free it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["freed", "freed"]
