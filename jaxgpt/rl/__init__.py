"""Learning from rewards: GRPO on the model's own samples and DPO from preference pairs."""

from jaxgpt.rl.config import load_config
from jaxgpt.rl.loop import run

__all__ = ["run", "load_config"]
