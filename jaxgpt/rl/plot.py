"""`DIR/rl_metrics.jsonl` -> `DIR/rl_reward.png`: the reward curve (GRPO) or the preference margin (DPO),
with the KL to the reference underneath. Needs matplotlib (`pip install jaxgpt[plot]`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PNG_FILE = "rl_reward.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "rl_metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if key in r]
    return (np.asarray([s for s, _ in rows]), np.asarray([v for _, v in rows])) if rows else (np.zeros(0),) * 2


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window:
        return y
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), np.ones(window) / window, mode="valid")


def plot_run(run_dir: str | Path) -> Path | None:
    """Write the PNG; returns its path, or None (with a note) when matplotlib is missing or nothing is logged."""
    records = read_metrics(run_dir)
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: install matplotlib (pip install 'jaxgpt[plot]') for the reward curve PNG")
        return None
    is_dpo = any("reward_margin" in r for r in records)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    if is_dpo:
        for key, label in (("reward_margin", "train margin"), ("val_reward_margin", "held-out margin")):
            x, y = _series(records, key)
            top.plot(x, y, marker="o" if key.startswith("val") else None, label=label)
        top.set_ylabel("implicit reward margin (beta x log-ratio)")
        x, y = _series(records, "val_reward_accuracy")
        bottom.plot(x, y, marker="o", color="C2")
        bottom.set_ylabel("held-out preference accuracy")
    else:
        x, y = _series(records, "reward")
        top.plot(x, y, color="C0", alpha=0.3, label="train batch")
        top.plot(x, _smooth(y, 10), color="C0", label="train (10-step mean)")
        x, y = _series(records, "eval_reward")
        top.plot(x, y, color="C3", marker="o", label="held-out prompts")
        top.set_ylabel("mean reward")
        x, y = _series(records, "eval_kl_seq")
        bottom.plot(x, y, color="C2", marker="o")
        bottom.set_ylabel("KL to reference\n(nats per completion)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    bottom.set_xlabel("step")
    top.set_title(f"{'DPO' if is_dpo else 'GRPO'}: {Path(run_dir).name}")
    fig.tight_layout()
    out = Path(run_dir) / PNG_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
