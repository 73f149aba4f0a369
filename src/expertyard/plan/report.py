"""Plain-text (and Markdown) tables of plans and predictions."""

from __future__ import annotations

from expertyard.plan.perf_model import Prediction
from expertyard.plan.search import Plan


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Columns aligned: text left, numbers right (or a Markdown table)."""
    if markdown:
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"
        return "\n".join(["| " + " | ".join(headers) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


CANDIDATE_HEADERS = ["#", "tp_a", "n_a", "tp_e", "n_e", "m", "b_a", "batch", "unit", "reps", "TPOT ms", "T_a ms",
                     "T_e ms", "T_c ms", "tok/s", "tok/s/GPU", "tok/USD"]


def candidate_rows(plans: list[Plan]) -> list[list[str]]:
    rows = []
    for i, p in enumerate(plans, 1):
        q, d = p.prediction, p.prediction.deployment
        rows.append([str(i), str(d.tp_a), str(d.n_a), str(d.tp_e), str(d.n_e), str(d.m), str(d.b_a),
                     str(d.global_batch), str(d.gpus), str(p.replicas), _fmt(q.tpot * 1e3, 1), _fmt(q.t_a * 1e3, 3),
                     _fmt(q.t_e * 1e3, 3), _fmt(q.t_c * 1e3, 3), _fmt(p.total_throughput), _fmt(q.per_gpu),
                     _fmt(q.per_dollar)])
    return rows


def describe_prediction(q: Prediction, usable_a: float, usable_e: float, async_scheduling: bool = False) -> list[str]:
    d = q.deployment
    host = "overlapping the GPUs (async scheduling)" if async_scheduling else "serial with the GPUs"
    return [
        f"  unit: {d.n_a} attention node(s) x tp {d.tp_a} + {d.n_e} expert node(s) x tp {d.tp_e} = {d.gpus} GPUs",
        f"  micro-batches: m={d.m} of b_a={d.b_a} sequences per attention node, global batch {d.global_batch}",
        f"  per layer and micro-batch: T_a {q.t_a * 1e3:.3f} ms, T_e {q.t_e * 1e3:.3f} ms, T_c {q.t_c * 1e3:.3f} ms; "
        f"LM head {q.t_h * 1e3:.3f} ms per micro-batch; driver host work {q.t_step * 1e3:.3f} ms per iteration, "
        f"{host}",
        f"  constraints: balance |T_a-T_e|/T_f = {q.balance:.1%}, T_c < T_f: {'yes' if q.comm_hidden else 'NO'}, "
        f"m >= 2(1+T_c/T_f) = {q.min_micro_batches:.2f}: {'yes' if d.m >= q.min_micro_batches else 'NO'}, "
        f"memory: {'fits' if q.fits_memory else 'DOES NOT FIT'}",
        f"  memory per GPU: attention {q.attn_mem_bytes / 1e9:.1f} GB of {usable_a / 1e9:.1f} usable, "
        f"expert {q.expert_mem_bytes / 1e9:.1f} GB of {usable_e / 1e9:.1f} usable",
        f"  TPOT {q.tpot * 1e3:.2f} ms; decode throughput {_fmt(q.throughput)} tok/s, {_fmt(q.per_gpu)} tok/s per GPU"
        + (f", {_fmt(q.per_dollar)} tokens per USD" if q.per_dollar is not None else ""),
    ]
