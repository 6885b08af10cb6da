"""Orbax checkpoints in `RUN_DIR/checkpoints`: async saves, the latest two and the best by one metric.

Every training mode uses this one checkpointer; the metric and its direction ("val_loss"/min for pretraining,
the selection metric for a fine-tune, "eval_reward"/max for GRPO) are written to `checkpoints/selection.json`,
so readers rank checkpoints as the writer did. Items per step: `params`, `opt_state` (so inference can
restore params alone) and `meta` (JSON: step, the step's metrics, the loop's own state such as early-stopping
counters, and the SHA-256 of every array's bytes). A checkpoint that fails to restore or whose arrays do
not match their checksums is moved aside to `RUN_DIR/corrupt_checkpoints/` and the previous good one is
used, with a warning; when none is good, resuming stops with an error instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxgpt import files
from jaxgpt.errors import JaxgptError

SELECTION_FILE = "selection.json"


def ranker(metric: str, mode: str):
    """The value a step is ranked by (lower is better for "min"), from the metrics saved with it."""
    def value(metrics: dict) -> float:
        v = float(metrics.get(metric, math.nan))
        if math.isfinite(v):
            return v
        return math.inf if mode == "min" else -math.inf  # NaN (or a step saved without it) never ranks best

    return value


def read_selection(folder: Path) -> tuple[str, str]:
    """(metric, 'min' or 'max') the checkpoints in `folder` are ranked by; val_loss/min for older run dirs."""
    path = folder / SELECTION_FILE
    if not path.is_file():
        return "val_loss", "min"
    chosen = json.loads(path.read_text())
    return chosen["metric"], chosen["mode"]


def checksums(tree) -> dict[str, str] | None:
    """SHA-256 of each array's bytes by tree path; None when arrays span hosts (this one cannot read them)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for _, leaf in leaves):
        return None
    out = {}
    for path, leaf in leaves:
        bytes_N = np.ascontiguousarray(jax.device_get(leaf)).reshape(-1).view(np.uint8)
        out[jax.tree_util.keystr(path)] = hashlib.sha256(bytes_N).hexdigest()
    return out


def checksum_damage(tree, expected: dict[str, str] | None) -> str | None:
    """None if `tree` matches the checksums saved with it (or none were saved), else what differs."""
    if not expected:
        return None
    got = checksums(tree) or {}
    bad = [k for k, v in got.items() if k in expected and expected[k] != v]
    return f"checksum mismatch in {len(bad)} array(s), first {bad[0]}" if bad else None


def _damage(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def _manager(folder: Path, read_only: bool = False, selection: tuple[str, str] | None = None) -> ocp.CheckpointManager:
    # LatestN(2) keeps a fallback when the newest is damaged; BestN keeps the best by the selection metric.
    metric, mode = selection or read_selection(folder)  # the writer's own: other hosts may not see the file yet
    best = ranker(metric, mode)
    policy = pp.AnyPreservationPolicy([pp.LatestN(n=2), pp.BestN(get_metric_fn=best, reverse=mode == "min", n=1)])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, preservation_policy=policy, best_fn=best, best_mode=mode,
        create=not read_only)
    return ocp.CheckpointManager(folder.absolute(), options=options, item_names=("params", "opt_state", "meta"))


class Checkpointer:
    """Saves train states {"step", "params", "opt_state"} ranked by `metric` (`mode` 'min' or 'max')."""

    def __init__(self, run_dir: str | Path, metric: str = "val_loss", mode: str = "min"):
        self.folder = Path(run_dir) / "checkpoints"
        self.metric, self.mode = metric, mode
        if read_selection(self.folder) != (metric, mode) and jax.process_index() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(self.folder / SELECTION_FILE, json.dumps({"metric": metric, "mode": mode}) + "\n")
        self.mngr = _manager(self.folder, selection=(self.metric, self.mode))
        self.loop_state: dict[str, Any] = {}  # the restored checkpoint's loop state (early stopping, ...)

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float],
             loop_state: dict[str, Any] | None = None) -> None:
        """Save `state` with its step's `metrics` (which should hold the selection metric) and the loop's state."""
        clean = {k: float(v) for k, v in metrics.items() if k != "step" and not isinstance(v, str)}
        sums = {"params": checksums(state["params"]), "opt_state": checksums(state["opt_state"])}
        self.mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave({"step": step, **clean, "loop": loop_state or {}, "sha256": sums})),
            metrics=clean, force=True)

    def best_step(self) -> int | None:
        self.mngr.wait_until_finished()
        return self.mngr.best_step()

    def restore_latest(self, abstract_state: dict[str, Any]) -> dict[str, Any] | None:
        """The newest good state (shardings from `abstract_state`), or None for a fresh run; its loop state
        goes to `self.loop_state`.

        Raises when checkpoints were written but none is good: training never silently starts over."""
        damage = []
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                restored = self.mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                    meta=ocp.args.JsonRestore()))
                sums = dict(restored.meta).get("sha256") or {}
                bad = (checksum_damage(restored.params, sums.get("params"))
                       or checksum_damage(restored.opt_state, sums.get("opt_state")))
            except Exception as e:  # noqa: BLE001  (orbax raises many types for damaged files)
                bad = _damage(e)
            if bad:
                damage.append(f"step {step}: {bad}")
                self._quarantine(step, bad)
                continue
            step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), abstract_state["step"].sharding)
            self.loop_state = dict(restored.meta).get("loop") or {}
            return {"step": step_array, "params": restored.params, "opt_state": restored.opt_state}
        aside = self.folder.parent / "corrupt_checkpoints"
        if damage or (aside.is_dir() and any(aside.iterdir())):
            raise JaxgptError(f"no good checkpoint in '{self.folder}' ({'; '.join(damage) or 'all were damaged'}); "
                              f"the damaged ones are in '{aside}': restore a backup, or delete that folder to "
                              "start over from step 0")
        return None

    def _quarantine(self, step: int, damage: str) -> None:
        self.mngr.close()
        aside = self.folder.parent / "corrupt_checkpoints" / str(step)
        while aside.exists():  # the same step can go bad twice
            aside = aside.with_name(aside.name + "_")
        if jax.process_index() == 0:
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(self.folder / str(step)), str(aside))
        warnings.warn(f"checkpoint step {step} is damaged ({damage}); moved it to {aside} and falling back to the "
                      "previous one", stacklevel=3)
        # A failed restore can leave a manager unusable.
        self.mngr = _manager(self.folder, selection=(self.metric, self.mode))

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def parse_which(which: str | int) -> str | int:
    """'best', 'latest' or a step number (as given to --checkpoint)."""
    text = str(which).strip()
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise JaxgptError(f"--checkpoint '{which}' is not 'best', 'latest' or a step number")


def restore_params(run_dir: str | Path, abstract_params, which: str = "best") -> tuple[Any, int]:
    """Parameters only, for inference: `which` is 'best' (by the run's selection metric), 'latest' or a step.

    A damaged 'best' or 'latest' falls back, with a warning, to the newest good one; the run dir is only read."""
    which = parse_which(which)
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise JaxgptError(f"no checkpoints in '{run_dir}'; train first with: jaxgpt train --run-dir {run_dir}")
    mngr = _manager(folder, read_only=True)
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise JaxgptError(f"'{folder}' holds no finished checkpoint; train first or wait for a save")
        if isinstance(which, int):
            if which not in steps:
                raise JaxgptError(f"no checkpoint at step {which} in '{folder}'; available: {sorted(steps)}")
            candidates = [which]
        else:
            first = (mngr.best_step() or steps[0]) if which == "best" else steps[0]
            candidates = [first] + [s for s in steps if s != first]
        damage = []
        for step in candidates:
            try:
                restored = mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
                bad = checksum_damage(restored.params, (dict(restored.meta).get("sha256") or {}).get("params"))
            except Exception as e:  # noqa: BLE001
                bad = _damage(e)
                mngr.close()
                mngr = _manager(folder, read_only=True)  # a failed restore can leave a manager unusable
            if not bad:
                if damage:
                    warnings.warn(f"{'; '.join(damage)}; using step {step} instead (resume training to move the "
                                  "damaged ones aside)", stacklevel=2)
                return restored.params, step
            damage.append(f"checkpoint step {step} in '{folder}' is damaged ({bad})")
        raise JaxgptError(f"{'; '.join(damage)}; pass another --checkpoint step or restore the run dir from a backup")
    finally:
        mngr.close()
