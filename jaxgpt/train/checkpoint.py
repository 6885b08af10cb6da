"""Orbax checkpoints in `RUN_DIR/checkpoints`: async saves, the latest two and the best by validation loss.

Items per step: `params`, `opt_state` (so inference can restore params alone) and `meta` (JSON: step,
val_loss). A checkpoint that fails to restore is moved aside to `RUN_DIR/corrupt_checkpoints/` and the
previous good one is used, with a warning.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxgpt.errors import JaxgptError


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


def _manager(folder: Path, read_only: bool = False) -> ocp.CheckpointManager:
    # LatestN(2) keeps a fallback when the newest is damaged; BestN keeps the best by val loss.
    policy = pp.AnyPreservationPolicy([pp.LatestN(n=2), pp.BestN(get_metric_fn=_val_loss, reverse=True, n=1)])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, preservation_policy=policy, best_fn=_val_loss, best_mode="min",
        create=not read_only)
    return ocp.CheckpointManager(folder.absolute(), options=options, item_names=("params", "opt_state", "meta"))


class Checkpointer:
    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / "checkpoints"
        self.mngr = _manager(self.folder)

    def save(self, step: int, state: dict[str, Any], val_loss: float) -> None:
        self.mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave({"step": step, "val_loss": val_loss})),
            metrics={"val_loss": val_loss}, force=True)

    def restore_latest(self, abstract_state: dict[str, Any]) -> dict[str, Any] | None:
        """The newest restorable state (shardings from `abstract_state`), or None for a fresh run."""
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                restored = self.mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001  (orbax raises many types for damaged files)
                self._quarantine(step, e)
                continue
            step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), abstract_state["step"].sharding)
            return {"step": step_array, "params": restored.params, "opt_state": restored.opt_state}
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        self.mngr.close()
        aside = self.folder.parent / "corrupt_checkpoints" / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(self.folder / str(step)), str(aside))
        warnings.warn(f"checkpoint step {step} could not be restored ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:160]}); moved it to {aside} and falling back to the previous one",
                      stacklevel=3)
        self.mngr = _manager(self.folder)  # a failed restore can leave a manager unusable

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def restore_params(run_dir: str | Path, abstract_params, which: str = "best") -> tuple[Any, int]:
    """Parameters only, for inference: `which` is 'best' (lowest val loss), 'latest' or a step number."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise JaxgptError(f"no checkpoints in '{run_dir}'; train first with: jaxgpt train --run-dir {run_dir}")
    mngr = _manager(folder, read_only=True)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise JaxgptError(f"'{folder}' holds no finished checkpoint; train first or wait for a save")
        if which == "best":
            step = mngr.best_step() or mngr.latest_step()
        elif which == "latest":
            step = mngr.latest_step()
        else:
            step = int(which)
            if step not in steps:
                raise JaxgptError(f"no checkpoint at step {step} in '{folder}'; available: {sorted(steps)}")
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        except Exception as e:  # noqa: BLE001
            raise JaxgptError(f"checkpoint step {step} in '{folder}' is damaged ({type(e).__name__}); "
                              "pass another step or resume training to fall back to an earlier one") from None
        return restored.params, step
    finally:
        mngr.close()
