"""What this job may use, as its scheduler or container limits it, not what the node has: the cores
(CPU affinity, ``SLURM_CPUS_PER_TASK``, a cgroup CPU quota) and the memory (a cgroup memory limit,
v1 or v2, less what the job already uses). A Slurm job with ``mem_gb: 32`` on a 512 GB node is
killed at 32 GB, and a container given 8 CPUs of a 128-core host is throttled to 8."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit number


def job_cores(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int:
    """The cores this process may keep busy: its CPU affinity (cpusets, taskset, Slurm's binding),
    at most ``SLURM_CPUS_PER_TASK`` and at most a cgroup CPU quota, rounded up."""
    cores = len(os.sched_getaffinity(0))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cores = min(cores, int(slurm))
    quota = cgroup_cpu_quota(root, proc)
    return max(1, min(cores, quota) if quota else cores)


def job_memory_available(
    root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP, meminfo: Path = MEMINFO
) -> int | None:
    """Bytes this job can still take: the node's MemAvailable, or less where a cgroup limits the
    job (its limit less its usage, reclaimable file pages not counted); None where neither is known."""
    known = [m for m in (node_memory_available(meminfo), cgroup_memory_headroom(root, proc)) if m is not None]
    return min(known) if known else None


def node_memory_available(meminfo: Path = MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_memory_headroom(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int | None:
    """The least headroom (limit less usage) of this process's cgroup and every cgroup above it:
    Slurm limits the job's cgroup, a parent of the task's. None without a limit."""
    headroom = None
    for folder, version in _cgroup_folders("memory", root, proc):
        if version == 2:
            limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
            inactive = _stat(folder / "memory.stat", "inactive_file")
        else:
            limit = _read_int(folder / "memory.limit_in_bytes")
            usage = _read_int(folder / "memory.usage_in_bytes")
            inactive = _stat(folder / "memory.stat", "total_inactive_file")
        if limit is None or limit >= UNLIMITED:
            continue
        used = max(0, (usage or 0) - (inactive or 0))
        room = max(0, limit - used)
        headroom = room if headroom is None else min(headroom, room)
    return headroom


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int | None:
    """The CPUs a cgroup quota allows (``cpu.max`` or ``cpu.cfs_quota_us``), rounded up; None without one."""
    quota = None
    for folder, version in _cgroup_folders("cpu", root, proc):
        if version == 2:
            fields = _read(folder / "cpu.max").split()
            limit, period = (fields + ["", ""])[:2] if fields else ("max", "")
        else:
            limit, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if not (limit.isdigit() and period.isdigit() and int(period) > 0):
            continue  # "max", -1 or unreadable: no quota here
        cpus = max(1, math.ceil(int(limit) / int(period)))
        quota = cpus if quota is None else min(quota, cpus)
    return quota


def _cgroup_folders(controller: str, root: Path, proc: Path) -> list[tuple[Path, int]]:
    """``(folder, version)`` of this process's cgroup for ``controller`` and of each cgroup above
    it, up to the mount's root. In a container (its own cgroup namespace, or a mount of its own
    cgroup only) the path /proc names may not exist under the mount: its root stands for it."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        names = controllers.split(",")
        if controller in names:  # cgroup v1: a hierarchy of its own
            mounts = [root / ",".join(names), root / controller]
            version = 1
        elif controllers == "" and (root / "cgroup.controllers").exists():
            mounts, version = [root], 2
        else:
            continue
        mount = next((m for m in mounts if m.is_dir()), None)
        if mount is None:
            continue
        relative = Path(path.strip().lstrip("/"))
        while relative.parts and not (mount / relative).is_dir():
            relative = relative.parent
        folders = [mount / relative]
        while relative.parts:
            relative = relative.parent
            folders.append(mount / relative)
        return [(folder, version) for folder in folders]
    return []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int | None:
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None
