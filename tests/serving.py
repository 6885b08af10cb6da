"""Run an app under uvicorn in a thread on a free loopback port, for tests that talk HTTP to it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app):
    """Yield the base URL while `app` serves; shut it down after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def start_server_process(argv: list[str], stream_chunk: int) -> tuple[subprocess.Popen, str]:
    """`python ARGV... --port P --stream-chunk N` (a `jaxgpt serve` command line) on a free port, once /health
    answers 200: (the process, its base URL). Fails the test if the server exits first."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, *argv, "--port", str(port), "--stream-chunk", str(stream_chunk)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                pytest.fail(f"the server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the server at {url} did not answer /health within two minutes")
