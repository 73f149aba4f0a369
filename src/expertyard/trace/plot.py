"""Hit rate against cache size, one curve per policy, from the rows of `expertyard simulate --sweep`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_hit_rates(rows: list[dict], path: str | Path, title: str) -> None:
    """rows: dicts with policy, predictor, cache_fraction, hit_rate (`SimResult.summary` + cache_fraction)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = r["policy"] if r["predictor"] == "none" else f"{r['policy']} + {r['predictor']}"
        if r["policy"] == "belady":
            label += " (offline bound)"
        curves.setdefault(label, []).append((100 * r["cache_fraction"], r["hit_rate"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="--" if "belady" in label else "-", label=label)
    ax.set_xlabel("cache size (% of all routed experts)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
