"""Pretraining: optimizer, jitted steps, checkpoints and the loop."""

from jaxgpt.train.loop import Trainer, train

__all__ = ["Trainer", "train"]
