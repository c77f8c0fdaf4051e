"""CPU and memory are reported against the container's limits when it has them.

The cgroup trees below are written in the kernel's own file formats.
"""

from __future__ import annotations

from pathlib import Path

from app.platform.system import CgroupLimits, SystemMonitor

GIB = 1 << 30


def cgroup_v2(
    root: Path, *, memory_max: str, memory_current: int, cpu_max: str, usage_usec: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "memory.max").write_text(f"{memory_max}\n")
    (root / "memory.current").write_text(f"{memory_current}\n")
    (root / "cpu.max").write_text(f"{cpu_max}\n")
    (root / "cpu.stat").write_text(f"usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 1\n")
    return root


def cgroup_v1(root: Path, *, limit: int, usage: int, quota: int, period: int) -> Path:
    for sub in ("memory", "cpu", "cpuacct"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    (root / "cpuacct" / "cpuacct.usage").write_text("5000000000\n")
    return root


def test_v2_memory_is_a_share_of_the_containers_limit(tmp_path: Path) -> None:
    root = cgroup_v2(
        tmp_path, memory_max=str(2 * GIB), memory_current=GIB, cpu_max="max 100000", usage_usec=0
    )
    sample = SystemMonitor(cgroup=CgroupLimits(root), disk_path=tmp_path).sample()

    assert sample.basis == "container"
    assert sample.memory_percent == 50.0


def test_v2_cpu_is_a_share_of_the_quota_between_two_readings(tmp_path: Path) -> None:
    root = cgroup_v2(
        tmp_path, memory_max="max", memory_current=GIB, cpu_max="50000 100000", usage_usec=0
    )
    monitor = SystemMonitor(cgroup=CgroupLimits(root), disk_path=tmp_path)
    monitor.sample()
    previous_usage, previous_at = monitor._previous_cpu or (0.0, 0.0)
    # Pretend exactly 1 s passed and half a core's worth of CPU was used: 100% of 0.5 cores.
    monitor._previous_cpu = (previous_usage, previous_at - 1.0)
    (root / "cpu.stat").write_text("usage_usec 500000\n")

    sample = monitor.sample()

    assert sample.basis == "container"
    assert 95.0 <= sample.cpu_percent <= 100.0


def test_without_limits_the_host_figures_are_reported(tmp_path: Path) -> None:
    root = cgroup_v2(
        tmp_path, memory_max="max", memory_current=GIB, cpu_max="max 100000", usage_usec=0
    )
    sample = SystemMonitor(cgroup=CgroupLimits(root), disk_path=tmp_path).sample()

    assert sample.basis == "host"
    assert 0.0 <= sample.memory_percent <= 100.0


def test_v1_limits_are_read_too(tmp_path: Path) -> None:
    reading = CgroupLimits(
        cgroup_v1(tmp_path, limit=4 * GIB, usage=GIB, quota=200000, period=100000)
    ).read()

    assert reading.memory_limit_bytes == 4 * GIB
    assert reading.memory_used_bytes == GIB
    assert reading.cpu_limit_cores == 2.0
    assert reading.cpu_usage_seconds == 5.0


def test_v1_no_limit_sentinels_mean_no_limit(tmp_path: Path) -> None:
    reading = CgroupLimits(
        cgroup_v1(tmp_path, limit=9223372036854771712, usage=GIB, quota=-1, period=100000)
    ).read()

    assert reading.memory_limit_bytes is None
    assert reading.cpu_limit_cores is None


def test_a_missing_cgroup_tree_reads_as_no_limits(tmp_path: Path) -> None:
    reading = CgroupLimits(tmp_path / "absent").read()

    assert reading == type(reading)(None, None, None, None)
