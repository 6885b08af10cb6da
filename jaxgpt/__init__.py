"""jaxgpt: GPT training and inference in JAX/Flax.

Attributes load lazily so `import jaxgpt` stays cheap and the CLI can set XLA flags before JAX starts.
"""

__version__ = "0.1.0"

# Training lives in the `jaxgpt.train` subpackage: `from jaxgpt.train import train`.
_LAZY = {"load": "jaxgpt.api", "LanguageModel": "jaxgpt.api", "Config": "jaxgpt.config", "GPT": "jaxgpt.model", "JaxgptError": "jaxgpt.errors",
         "from_pretrained": "jaxgpt.convert.hf", "load_exported": "jaxgpt.exported",
         "load_classifier": "jaxgpt.finetune.infer", "Classifier": "jaxgpt.finetune.infer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxgpt' has no attribute '{name}'")


__all__ = list(_LAZY)
