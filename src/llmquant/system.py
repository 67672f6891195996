"""Facts about the process every stage needs (no imports of other llmquant modules)."""

from __future__ import annotations

import os


def default_threads(threads: int | None = None) -> int:
    """``threads`` when given, else the CPUs this process may run on (its affinity mask)."""
    if threads:
        return threads
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
