"""Fitted lines from measured points (float64 least squares), and the step and exchange terms solved from the
TPOTs of two null deployments (bench/plan_step.py measures them; docs/plan.md explains the terms). Pure arithmetic:
nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from expertyard.plan.perf_model import Line


def fit_line(xs, ys) -> Line:
    """Least-squares t = slope * x + intercept in float64."""
    x = np.asarray(xs, dtype=np.float64)
    a = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=np.float64), rcond=None)
    return Line(float(slope), float(intercept))


def solve_step(tpots, head: Callable | None = None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """From [[B, TPOT(L1), TPOT(L2)], ...] (seconds): ([(B, T_step)], [(B, T_layer)]), T_layer = TPOT(L2) -
    TPOT(L1), T_step = TPOT(L1) - T_layer - head(B). `head`: the model's LM-head time of B sequences (T_h at
    m = 1), which the performance model adds on its own. Noise can make values negative: they are kept, the
    fit clamps."""
    steps, layers = [], []
    for b, t1, t2 in tpots:
        layer = t2 - t1
        steps.append((int(b), t1 - layer - (float(head(b)) if head is not None else 0.0)))
        layers.append((int(b), layer))
    return steps, layers


def fit_step(points) -> tuple[Line, list[str]]:
    """T_step(B) = slope * B + intercept (seconds) by least squares, with each part kept >= 0 (a profile's
    overheads are; noise, or an LM-head estimate above the real one, can push a fitted part below): a negative
    intercept is refitted as 0 with the slope through the origin, a negative slope as 0 with the mean as the
    intercept; one batch size gives the fixed part only. Returns the line and a note for each of these."""
    xs, ys = (np.asarray(v, dtype=np.float64) for v in zip(*points))
    notes = []
    if len(set(xs.tolist())) < 2:
        notes.append("one batch size: the fixed part only")
        line = Line(0.0, float(ys.mean()))
    else:
        line = fit_line(xs, ys)
    if line.intercept < 0:
        notes.append(f"fitted fixed part {line.intercept * 1e6:.1f} us < 0: set to 0, slope refitted through 0")
        line = Line(float(xs @ ys / (xs @ xs)), 0.0)
    if line.slope < 0:
        notes.append(f"fitted per-sequence part {line.slope * 1e6:.3f} us < 0: set to 0, fixed part = the mean")
        line = Line(0.0, max(0.0, float(ys.mean())))
    return line, notes


def exchange_residuals(model, layers) -> list[tuple[int, float]]:
    """[(b, T_layer(b) - modelled)]: one MoE layer of the null deployments (1 + 1 ranks, m = 1, b sequences)
    beyond what `model` (a PerfModel without T_x, at the null runs' cache length) prices for it, T_a + T_e +
    2 T_c of that layer. What is left is the runtime's own work around the exchange; may be negative (noise)."""
    out = []
    for b, layer in layers:
        t_a, t_e, t_c, _ = model.times(1, 1, 1, 1, b)  # t_e, t_c: averaged over all layers by the MoE share
        moe_layer = float(t_a) + (float(t_e) + 2 * float(t_c)) / model.moe_fraction
        out.append((int(b), float(layer) - moe_layer))
    return out
