"""Pretraining: optimizer, jitted steps, checkpoints and the loop.

`Trainer` and `train` load lazily, so the CLI can import `jaxgpt.train.signals` without Flax (a server
of an exported artifact runs without it).
"""

__all__ = ["Trainer", "train"]


def __getattr__(name):
    if name in __all__:
        from jaxgpt.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'jaxgpt.train' has no attribute '{name}'")
