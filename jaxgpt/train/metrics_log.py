"""Run metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events, process 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        # Lines past the checkpoint we resume from describe steps that will be run again.
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        for key, value in clean.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self.tb.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
