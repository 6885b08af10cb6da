"""Orbax checkpoints of a fine-tune: the latest and the best by the selection metric.

`max_to_keep` together with `best_fn` deletes the latest step (see FACTS.md), so a preservation
policy keeps LatestN(1) and BestN(1) instead. Items: `params` and `meta` (step and all metrics).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxgpt.errors import JaxgptError


class BestCheckpoints:
    def __init__(self, run_dir: str | Path, metric: str, mode: str, read_only: bool = False):
        self.folder = (Path(run_dir) / "checkpoints").absolute()
        self.metric, self.mode = metric, mode
        get = self._value
        policy = pp.AnyPreservationPolicy([pp.LatestN(n=1), pp.BestN(get_metric_fn=get, reverse=mode == "min", n=1)])
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=not read_only, preservation_policy=policy,
                                               best_fn=get, best_mode=mode, create=not read_only)
        self.mngr = ocp.CheckpointManager(self.folder, options=options, item_names=("params", "meta"))

    def _value(self, metrics: dict[str, float]) -> float:
        value = float(metrics[self.metric])
        if math.isfinite(value):
            return value
        return math.inf if self.mode == "min" else -math.inf  # NaN must never rank as the best

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, params, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     meta=ocp.args.JsonSave({"step": step, **clean})),
                       metrics=clean, force=True)

    def best_step(self) -> int | None:
        return self.mngr.best_step()

    def restore(self, abstract_params, which: str = "best") -> tuple[Any, dict[str, Any]]:
        """(params, meta) of 'best', 'latest' or a step number."""
        self.mngr.wait_until_finished()
        steps = self.steps()
        if not steps:
            raise JaxgptError(f"'{self.folder}' holds no fine-tune checkpoint; run `jaxgpt finetune` first")
        step = self.mngr.best_step() if which == "best" else self.mngr.latest_step() if which == "latest" else int(which)
        if step not in steps:  # restoring a missing step breaks the manager (FACTS.md): check first
            raise JaxgptError(f"no checkpoint at step {which} in '{self.folder}'; available: {steps}")
        restored = self.mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
        return restored.params, dict(restored.meta)

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
