"""jaxgpt: GPT training and inference in JAX/Flax.

Attributes load lazily so `import jaxgpt` stays cheap and the CLI can set XLA flags before JAX starts.
"""

__version__ = "0.1.0"

_LAZY = {"load": "jaxgpt.api", "LanguageModel": "jaxgpt.api", "train": "jaxgpt.train.loop",
         "Config": "jaxgpt.config", "GPT": "jaxgpt.model", "JaxgptError": "jaxgpt.errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxgpt' has no attribute '{name}'")


__all__ = list(_LAZY)
