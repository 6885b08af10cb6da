"""An OpenAI-compatible HTTP server for a run dir: `jaxgpt serve --run-dir R` (see app.py, batcher.py)."""

from jaxgpt.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
