"""What the machine has room for: free memory and free disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["system_memory_available", "disk_room"]


def system_memory_available() -> int | None:
    """The system's available memory (``MemAvailable``, which counts reclaimable caches), None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def disk_room(folder: str | os.PathLike | None) -> int:
    """Free bytes on the disk that holds ``folder`` (or will: a folder not made yet counts as its nearest
    existing parent); the system's temporary folder when None; 0 when unknown."""
    path = Path(folder or tempfile.gettempdir()).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
