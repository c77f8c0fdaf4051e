"""Host and process figures for `/health` and `/metrics`, sampled off the request path.

psutil's CPU figure is a difference between two readings; asking for it with an
interval (`cpu_percent(interval=1)`) sleeps, which on the event loop would stall
every request. Instead a background task reads everything every few seconds in a
worker thread (`cpu_percent(interval=None)`: utilisation since the previous
reading) and keeps the last `SystemSample`; requests only read that.

In a container, the host's figures are the wrong ones: a pod is OOM-killed at
its own memory limit and throttled at its own CPU quota, whatever the node has
free. When the process runs under a cgroup limit (v2, or v1), CPU and memory
are reported against that limit (`basis == "container"`); without one, against
the host (`basis == "host"`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from app.platform.background import every, stop_task
from app.platform.metrics import record_system


@dataclass(frozen=True, slots=True)
class SystemSample:
    """One reading. `disk_percent` is None when the disk path could not be read."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float | None
    rss_bytes: int
    taken_at: float  # wall-clock seconds (time.time())
    basis: str = "host"  # "container": CPU and memory against the cgroup's limits


@dataclass(frozen=True, slots=True)
class CgroupReading:
    """What the cgroup says; a None is a figure the cgroup does not limit or report."""

    cpu_usage_seconds: float | None
    cpu_limit_cores: float | None
    memory_used_bytes: int | None
    memory_limit_bytes: int | None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class CgroupLimits:
    """The limits and usage of the cgroup this process runs in (v2 or v1)."""

    # cgroup v1 writes "no limit" as a huge number rather than "max".
    _V1_UNLIMITED = 1 << 60

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root
        self.version = 2 if (root / "cgroup.controllers").exists() else 1

    def read(self) -> CgroupReading:
        return self._read_v2() if self.version == 2 else self._read_v1()

    def _read_v2(self) -> CgroupReading:
        usage = None
        try:
            for line in (self.root / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    usage = int(value) / 1_000_000
        except (OSError, ValueError):
            usage = None
        cores = None
        try:
            quota, period = (self.root / "cpu.max").read_text().split()[:2]
            if quota != "max":
                cores = int(quota) / int(period)
        except (OSError, ValueError):
            cores = None
        limit = _read_int(self.root / "memory.max")
        return CgroupReading(usage, cores, _read_int(self.root / "memory.current"), limit)

    def _read_v1(self) -> CgroupReading:
        usage_ns = _read_int(self.root / "cpuacct" / "cpuacct.usage")
        quota = _read_int(self.root / "cpu" / "cpu.cfs_quota_us")  # -1 (no quota) reads None
        period = _read_int(self.root / "cpu" / "cpu.cfs_period_us")
        limit = _read_int(self.root / "memory" / "memory.limit_in_bytes")
        return CgroupReading(
            cpu_usage_seconds=usage_ns / 1e9 if usage_ns is not None else None,
            cpu_limit_cores=quota / period if quota and period else None,
            memory_used_bytes=_read_int(self.root / "memory" / "memory.usage_in_bytes"),
            memory_limit_bytes=limit if limit and limit < self._V1_UNLIMITED else None,
        )


class SystemMonitor:
    """Samples CPU, memory, disk and this process's RSS every `interval_seconds`."""

    def __init__(
        self,
        *,
        interval_seconds: float = 5.0,
        disk_path: Path = Path("/"),
        cgroup: CgroupLimits | None = None,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.disk_path = disk_path
        self.cgroup = cgroup if cgroup is not None else CgroupLimits()
        self._previous_cpu: tuple[float, float] | None = None  # (usage s, monotonic s)
        self._process = psutil.Process()
        self._latest: SystemSample | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def latest(self) -> SystemSample | None:
        return self._latest

    def sample(self) -> SystemSample:
        """Read everything now (blocking, but short: call it from a thread)."""
        try:
            disk: float | None = psutil.disk_usage(str(self.disk_path)).percent
        except OSError:
            disk = None
        host_cpu = psutil.cpu_percent(interval=None)
        cpu, memory, basis = self._container_figures()
        sample = SystemSample(
            cpu_percent=cpu if cpu is not None else host_cpu,
            memory_percent=memory if memory is not None else psutil.virtual_memory().percent,
            disk_percent=disk,
            rss_bytes=self._process.memory_info().rss,
            taken_at=time.time(),
            basis=basis,
        )
        record_system(
            rss_bytes=sample.rss_bytes,
            cpu_percent=sample.cpu_percent,
            memory_percent=sample.memory_percent,
            disk_percent=sample.disk_percent,
        )
        self._latest = sample
        return sample

    def _container_figures(self) -> tuple[float | None, float | None, str]:
        """CPU % of the cgroup's quota and memory % of its limit, where it sets them."""
        reading = self.cgroup.read()
        memory = None
        if reading.memory_limit_bytes and reading.memory_used_bytes is not None:
            memory = min(100.0, 100.0 * reading.memory_used_bytes / reading.memory_limit_bytes)
        cpu = None
        now = time.monotonic()
        if reading.cpu_limit_cores and reading.cpu_usage_seconds is not None:
            if self._previous_cpu is not None:
                used = reading.cpu_usage_seconds - self._previous_cpu[0]
                elapsed = now - self._previous_cpu[1]
                if elapsed > 0:
                    cpu = max(0.0, 100.0 * used / (elapsed * reading.cpu_limit_cores))
            self._previous_cpu = (reading.cpu_usage_seconds, now)
        basis = "container" if (memory is not None or reading.cpu_limit_cores) else "host"
        return cpu, memory, basis

    async def start(self) -> None:
        """Take a first reading (so `/health` has figures at once), then sample in a loop."""
        # The first cpu_percent(interval=None) has nothing to compare with and says 0.0;
        # this reading primes it and the loop's next one is meaningful.
        await asyncio.to_thread(self.sample)
        self._task = asyncio.create_task(
            every(self.interval_seconds, self._sample_in_thread, what="system sample"),
            name="system-monitor",
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _sample_in_thread(self) -> None:
        await asyncio.to_thread(self.sample)
