"""A real llama.cpp OpenAI-compatible server for the tests: started, health-checked, stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(model: Path, log_path: Path, *, n_ctx: int, api_key: str | None = None):
    """Yield the base URL (`http://127.0.0.1:PORT/v1`) of a server on `model`; its log goes to `log_path`."""
    port = free_port()
    # A file, not a pipe: the server logs a lot while loading, and a full pipe would block it.
    log = Path(log_path).open("w+")
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", "1", "--n_ctx", str(n_ctx)]
    proc = subprocess.Popen(args + (["--api_key", api_key] if api_key else []),
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama.cpp server exited with {proc.returncode}: {log.read()[-1500:]}")
            try:
                urllib.request.urlopen(urllib.request.Request(base + "/models", headers=headers), timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    pytest.fail("llama.cpp server did not answer within 60 s")
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
