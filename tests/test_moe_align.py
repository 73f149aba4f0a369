"""moe_align's three paths (one-hot in one program, pair comparisons in one program, three kernels) against a
naive grouping in Python: each expert's pairs in one padded segment, segments in expert order, blocks labelled.
Here under Triton's interpreter on the CPU; compiled on the GPU in tests/gpu/test_moe_align_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (tokens, top-k, experts or slots, BLOCK_M, the path moe_align takes)
CASES = [(1, 6, 64, 16, "onehot"), (4, 2, 8, 16, "onehot"), (1, 2, 62, 64, "onehot"),
         (1, 6, 1472, 16, "pairs"), (8, 8, 416, 16, "pairs"), (16, 8, 5000, 32, "pairs"), (4, 2, 2000, 16, "pairs"),
         (300, 6, 64, 16, "three kernels"), (40, 8, 1472, 64, "three kernels")]


def naive(ids: list[int], num_experts: int, block_m: int):
    """(segments [(expert, first row, pairs)], expert per block, rows per block) up to the last used block."""
    segments, row = [], 0
    for e in sorted({e for e in ids if 0 <= e < num_experts}):
        pairs = [p for p, v in enumerate(ids) if v == e]
        segments.append((e, row, pairs))
        row += -(-len(pairs) // block_m) * block_m
    experts, rows = [], []
    for e, start, pairs in segments:
        for b in range(-(-len(pairs) // block_m)):
            experts.append(e)
            rows.append(min(block_m, len(pairs) - b * block_m))
    return segments, experts, rows


def check_case(device: str, t: int, k: int, e: int, block_m: int, path: str, bad_ids: bool) -> None:
    from expertyard.kernels import moe_align as ma

    g = torch.Generator().manual_seed(t * 1000 + e)
    skewed = torch.randint(0, min(e, 5), (t, k), generator=g)  # repeats: several pairs per expert
    ids = torch.where(torch.rand(t, k, generator=g) < 0.5, skewed, torch.randint(0, e, (t, k), generator=g))
    if bad_ids:  # -1 (a slot that is not resident) and >= E are dropped
        ids[0, 0], ids[-1, -1] = -1, e + 3
    zero = torch.full((t, 32), 7.0, device=device)
    bp, be = (max(16, 1 << (n - 1).bit_length()) for n in (t * k, e))
    small = zero.numel() <= ma._SMALL_ZERO
    taken = ("onehot" if bp * be <= ma._SMALL_ONEHOT and small else
             "pairs" if bp * bp <= ma._SMALL_ONEHOT and small and ma.pairs_path_on() else "three kernels")
    assert taken == (path if path != "pairs" or ma.pairs_path_on() else "three kernels"), (t, k, e)
    sorted_ids, block_experts, block_rows = ma.moe_align(ids.to(torch.int32).to(device), e, block_m, zero=zero)
    segments, want_experts, want_rows = naive(ids.flatten().tolist(), e, block_m)
    n = len(want_experts)
    assert block_experts[:n].tolist() == want_experts and block_rows[:n].tolist() == want_rows
    assert set(block_experts[n:].tolist()) <= {-1} and set(block_rows[n:].tolist()) <= {0}
    got = sorted_ids.tolist()
    for _, start, pairs in segments:  # the order inside a segment is free (atomics in the three-kernel path)
        assert sorted(got[start:start + len(pairs)]) == pairs
    assert (zero == 0).all()


def test_each_path_under_the_interpreter():
    pytest.importorskip("triton")
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "EXPERTYARD_MOE_ALIGN_PAIRS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests), os.environ.get("PYTHONPATH", "")])}
    script = ("from test_moe_align import CASES, check_case\n"
              "for case in CASES:\n"
              "    for bad in (False, True):\n"
              "        check_case('cpu', *case, bad)\n"
              "print('checked', 2 * len(CASES))")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == str(2 * len(CASES))
