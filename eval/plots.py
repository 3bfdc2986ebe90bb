"""`vtoken plot results.jsonl`: accuracy vs FLOPs (Pareto front per reducer), per-category accuracy,
visual tokens per LLM layer — one PNG."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vtoken.eval.shapes import CATEGORIES


def load(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def with_reference(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill retained % and FLOPs % (`runner.compare`) from the unreduced (`none`) record of the same model and task."""
    from vtoken.eval.runner import compare

    refs = {}
    for r in records:
        if r["config"]["reducer"] == "none":
            refs[(r["config"].get("model"), r["config"]["task"])] = r
    for r in records:
        ref = refs.get((r["config"].get("model"), r["config"]["task"]))
        if ref is not None:
            compare([r], ref)
    return records


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not dominated by one with fewer (or equal) FLOPs and higher accuracy, by FLOPs."""
    front, best = [], float("-inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def label(r: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in r["config"]["params"].items())
    return f"{r['config']['reducer']}({params})" if params else r["config"]["reducer"]


def plot(records: list[dict[str, Any]], out: str | Path) -> Path:
    records = with_reference(list(records))
    if not records:
        raise ValueError("no records to plot")
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    ax = axes[0]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    bars: dict[str, list[tuple[float, float, float]]] = defaultdict(list)  # x, bootstrap 95% interval
    for r in records:
        m = r["metrics"]
        x = m.get("flops_pct") or m["flops_per_sample"].get("total", 0) / 1e9
        series[r["config"]["reducer"]].append((x, 100 * m["accuracy"]))
        if "accuracy_ci95" in m:  # records written before the interval was recorded have none
            bars[r["config"]["reducer"]].append((x, 100 * m["accuracy_ci95"][0], 100 * m["accuracy_ci95"][1]))
    for name, pts in sorted(series.items()):
        if name == "none":
            ax.scatter(*zip(*pts), marker="*", s=220, color="black", label="unreduced", zorder=5)
            continue
        xs, ys = zip(*pts)
        sc = ax.scatter(xs, ys, s=30, alpha=0.6)
        if bars[name]:
            ax.vlines(*zip(*bars[name]), color=sc.get_facecolor()[0], alpha=0.4, linewidth=1)
        front = pareto(pts)
        ax.plot(*zip(*front), "-", color=sc.get_facecolor()[0], label=name)
    xlab = "FLOPs (% of unreduced)" if any(r["metrics"].get("flops_pct") for r in records) else "GFLOPs / sample"
    ax.set(xlabel=xlab, ylabel="accuracy (%)", title="accuracy vs FLOPs (lines: Pareto front)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    shown = records[:12]
    width = 0.8 / max(len(shown), 1)
    for i, r in enumerate(shown):
        pc = r["metrics"]["per_category"]
        ax.bar([j + i * width for j in range(len(CATEGORIES))], [100 * pc.get(c, 0) for c in CATEGORIES],
               width=width, label=label(r))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(CATEGORIES))], CATEGORIES, rotation=20)
    ax.set(ylabel="accuracy (%)", title="per category")
    ax.legend(fontsize=7)

    ax = axes[2]
    for r in shown:
        layers = r["metrics"].get("visual_tokens_per_layer") or []
        if layers:
            ax.plot(range(len(layers)), layers, marker=".", label=label(r))
    ax.set(xlabel="LLM layer", ylabel="visual tokens (mean per sample)", title="tokens per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
