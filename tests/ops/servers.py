"""Real server processes for the operations tests, started as operators start them.

`python -m app` (the container's command: uvicorn with the graceful-shutdown
timeout and worker count from the environment), in a child process of its own,
stopped by its process id: SIGTERM, then SIGKILL to its process group (its
workers) if it has not exited in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import httpx

from tests.support import ROOT, free_port

# The child's settings come from `env` only, never from the developer's shell.
_OWN_PREFIXES = (
    "OPENAI_",
    "REPLICATE_",
    "DATABASE_",
    "REDIS_",
    "RATE_LIMIT_",
    "HEALTH_",
    "SENTRY_",
    "MAINTENANCE_",
    "SHUTDOWN_",
    "TRUSTED_PROXIES",
    "PROMETHEUS_MULTIPROC_DIR",
    "WEB_CONCURRENCY",
    "FORWARDED_ALLOW_IPS",
)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@contextmanager
def app_server(env: Mapping[str, str], *, ready_within: float = 30.0) -> Iterator[Server]:
    """`python -m app` on 127.0.0.1 and a free port; yields it once /health/live answers."""
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    child_env.update({"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING"})
    child_env.update(env)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its workers go with it
        )
        server = Server(f"http://127.0.0.1:{port}", process, log)
        try:
            _wait_until_live(server, ready_within)
            yield server
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
    """SIGTERM by pid; after `grace` s, SIGKILL to the group this process leads."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _wait_until_live(server: Server, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.output()}"
            )
        try:
            if httpx.get(f"{server.url}/health/live", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not live within {within} s:\n{server.output()}")
        time.sleep(0.1)
