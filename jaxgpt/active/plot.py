"""Learning curves of several active-learning runs on one PNG, and the labels each needs to reach a target.

Runs are grouped by strategy (with `+div M` when the diversity option was on); each seed is a thin
line and the mean over seeds at each labelled-set size a thick one. Needs matplotlib (`jaxgpt[plot]`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxgpt.errors import JaxgptError

CURVE_FILE = "active_curve.jsonl"


def read_curve(path: str | Path) -> list[dict]:
    """The records of DIR/active_curve.jsonl (or of that file named directly)."""
    path = Path(path)
    file = path / CURVE_FILE if path.is_dir() else path
    if not file.is_file():
        raise JaxgptError(f"'{path}' holds no {CURVE_FILE}; pass run dirs of `jaxgpt active`")
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not records:
        raise JaxgptError(f"{file} is empty: the run has not finished a round yet")
    return records


def group_name(record: dict) -> str:
    div = record.get("diversity", 1)
    return record["strategy"] + (f"+div{div}" if div > 1 else "")


def labels_to_reach(records: list[dict], metric: str, target: float) -> int | None:
    """The smallest labelled-set size whose `metric` is >= target, or None if the curve never gets there."""
    return next((r["labelled"] for r in sorted(records, key=lambda r: r["labelled"])
                 if r.get(metric, -np.inf) >= target), None)


def summarize(curves: list[list[dict]], metric: str, target: float) -> list[dict]:
    """Per strategy: seeds, mean final metric, labels to reach `target` per seed and for the mean curve."""
    groups: dict[str, list[list[dict]]] = {}
    for records in curves:
        groups.setdefault(group_name(records[0]), []).append(records)
    rows = []
    for name, runs in sorted(groups.items()):
        sizes, mean = _mean_curve(runs, metric)
        mean_curve = [{"labelled": int(n), metric: float(v)} for n, v in zip(sizes, mean)]
        rows.append({"strategy": name, "seeds": sorted(r[0]["seed"] for r in runs),
                     f"final_{metric}": float(mean[-1]) if len(mean) else float("nan"),
                     "labels_per_seed": [labels_to_reach(r, metric, target) for r in runs],
                     "labels_mean_curve": labels_to_reach(mean_curve, metric, target)})
    return rows


def _mean_curve(runs: list[list[dict]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    # Means only over sizes every seed reached, so a shorter run does not bend the mean.
    common = set.intersection(*({r["labelled"] for r in run if metric in r} for run in runs))
    sizes = np.asarray(sorted(common))
    values = [[next(r[metric] for r in run if r["labelled"] == n) for run in runs] for n in sizes]
    return sizes, np.asarray([np.mean(v) for v in values])


def plot_curves(dirs: list[str], out: str | Path, metrics: tuple[str, ...] = ("test_accuracy", "test_macro_f1"),
                target: float | None = None) -> Path:
    """Write the PNG of `metrics` against labelled-set size for every run dir in `dirs`; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise JaxgptError("plotting needs matplotlib: pip install 'jaxgpt[plot]'") from None
    curves = [read_curve(d) for d in dirs]
    groups: dict[str, list[list[dict]]] = {}
    for records in curves:
        groups.setdefault(group_name(records[0]), []).append(records)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, (name, runs) in enumerate(sorted(groups.items())):
            color = f"C{k % 10}"
            for run in runs:
                pts = sorted((r["labelled"], r[metric]) for r in run if metric in r)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.25, linewidth=1)
            sizes, mean = _mean_curve(runs, metric)
            ax.plot(sizes, mean, color=color, marker="o", linewidth=2, label=f"{name} ({len(runs)} seeds)")
        if target is not None and metric == metrics[0]:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("labelled examples")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("active learning: mean over seeds (thick), each seed (thin)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
