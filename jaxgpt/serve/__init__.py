"""An OpenAI-compatible HTTP server and a chat page for a run dir or an exported artifact:
`jaxgpt serve --run-dir R` or `jaxgpt serve --exported DIR` (see app.py, batcher.py, engines.py)."""

from jaxgpt.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
