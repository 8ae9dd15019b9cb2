"""How much memory the machine has free, and sizes in words a user reads.

Read by the volume reader (refuse a file that cannot fit before allocating it) and by the
predictor (estimate a prediction's memory before running it). Linux reports free host
memory in ``/proc/meminfo``; a container's own limit (cgroup v2 ``memory.max``) can be
lower, and then it is the one that counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")


def _cgroup_free() -> int | None:
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = int((CGROUP / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_host_bytes() -> int | None:
    """Host memory a new allocation can take without swapping (None where the OS does not say)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    cgroup = _cgroup_free()
    if cgroup is not None:
        free = cgroup if free is None else min(free, cgroup)
    return free


def available_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device plus what torch's caching allocator holds unused (None on CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def gib(n_bytes: float) -> str:
    """``1.5 GiB``: a size as a user reads it."""
    return f"{n_bytes / 2**30:.2f} GiB"
