"""Small file helpers: atomic writes and file hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "sha256_file", "write_text_atomic", "pread_into", "pwrite_all"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    Readers never see a half-written file, and a crash leaves the previous version in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # some writers create their temporary file owner-only; the result gets the user's normal mode
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pread_into(fd: int, buffer, offset: int) -> int:
    """Fill ``buffer`` (a writable bytes-like object) from ``fd`` at ``offset`` with positional reads, which
    are safe from several threads at once; returns the bytes read, fewer only where the file ends."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (a bytes-like object) to ``fd`` at ``offset`` with positional writes, which may
    each write less than asked (Linux caps one call near 2 GiB)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
