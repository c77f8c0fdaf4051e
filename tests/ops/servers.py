"""Real server processes for the operations tests, started as operators start them.

`python -m app` (the container's command: uvicorn with the graceful-shutdown
timeout and worker count from the environment), in a child process of its own,
stopped by its process id: SIGTERM, then SIGKILL to its process group (its
workers) if it has not exited in time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from tests.support import Server, free_port, server_process


@contextmanager
def app_server(env: Mapping[str, str], *, ready_within: float = 30.0) -> Iterator[Server]:
    """`python -m app` on 127.0.0.1 and a free port; yields it once /health/live answers."""
    port = free_port()
    child_env = {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING", **env}
    with server_process(["-m", "app"], child_env, port=port, ready_within=ready_within) as server:
        yield server
