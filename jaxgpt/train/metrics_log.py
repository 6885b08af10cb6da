"""Run metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events, process 0 only.

The one JSONL logger of every mode (RL also logs its held-out samples through it, without TensorBoard). Each line is written whole with one append; a line cut off by a crash or a full disk is dropped on resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from jaxgpt import files


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int, name: str = "metrics.jsonl", tensorboard: bool = True):
        """Lines of steps after `resume_step` are dropped (-1 drops them all)."""
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / name
        self.tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        if not tensorboard:
            return
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        # Lines past the checkpoint we resume from describe steps that will be run again.
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut off mid-line (crash or full disk): that step is run and logged again
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        files.atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in record.items()}
        files.append_line(self.path, json.dumps(clean))
        if self.tb is None:
            return
        for key, value in clean.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self.tb.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
