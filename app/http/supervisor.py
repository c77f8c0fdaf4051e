"""The supervisor of several worker processes: uvicorn's, with two gaps closed.

With `WEB_CONCURRENCY` > 1, uvicorn's `Multiprocess` binds the listening socket
in the parent and hands it to each worker. Two things it does not do:

* **Let go of the socket on shutdown.** On SIGTERM each worker stops accepting,
  but the parent keeps its copy of the socket open until every worker has
  drained (up to `SHUTDOWN_GRACE_SECONDS`). The port stays in LISTEN, so the
  kernel completes the handshake of every new connection into a backlog nobody
  reads; those callers (a readiness probe among them) hang, then are reset when
  the parent exits. With one worker they are refused at once. Here the parent
  closes its copy as soon as it has told the workers to stop, so once the
  workers have closed theirs the port refuses new connections, as with one.
* **Forget a dead worker's metrics.** With `PROMETHEUS_MULTIPROC_DIR`, each
  worker's gauges live in files named after its pid; a worker that is killed
  (SIGKILL, the OOM killer) never removes them, and "live" gauges (in flight,
  memory, storage degraded) went on counting its last values. When a worker is
  found dead and replaced, and when the workers have exited, its live-gauge
  files are removed (prometheus-client's `mark_process_dead`).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

logger = logging.getLogger(__name__)


def forget_worker_metrics(pid: int | None) -> None:
    """Drop the live gauges of worker `pid` (no-op without PROMETHEUS_MULTIPROC_DIR)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if pid is None or not directory:
        return
    try:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    except OSError as error:  # a metrics directory problem must not stop the supervisor
        logger.warning("could not remove the metrics of worker %d: %s", pid, error)


class Supervisor(Multiprocess):
    """uvicorn's `Multiprocess`, closing its socket on shutdown and forgetting dead workers."""

    def terminate_all(self) -> None:
        super().terminate_all()
        for sock in self.sockets:
            sock.close()

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {process.pid for process in self.processes}:
            logger.warning("worker %s died and was replaced; its gauges are dropped", pid)
            forget_worker_metrics(pid)

    def join_all(self) -> None:
        super().join_all()
        for process in self.processes:
            forget_worker_metrics(process.pid)
