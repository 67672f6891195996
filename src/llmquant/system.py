"""Facts about the process every stage needs (no imports of other llmquant modules)."""

from __future__ import annotations

import os


def default_threads(threads: int | None = None) -> int:
    """``threads`` when given, else the CPUs this process may run on (its affinity mask)."""
    if threads:
        return threads
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def free_disk_bytes(folder) -> int:
    """Bytes free for this user on the file system holding ``folder`` (its nearest existing parent)."""
    import shutil
    from pathlib import Path

    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(folder, need: int, what: str = "file", margin: int = 64 << 20) -> None:
    """Refuse (DiskSpaceError, before anything is written) when ``need`` bytes plus a small margin
    would not fit in ``folder``."""
    from .errors import DiskSpaceError

    free = free_disk_bytes(folder)
    if need + margin > free:
        raise DiskSpaceError(folder, need, free, what)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def available_memory() -> int:
    """Bytes of memory free for a new allocation (MemAvailable; all of RAM where unknown)."""
    info = meminfo()
    return info.get("MemAvailable") or info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
