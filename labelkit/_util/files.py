"""Small file helpers: atomic writes of files and folders, key files, hashing, positional I/O.

Every output labelkit writes is published one way: written under a temporary name beside its place, then
renamed over it, with the mode the user's umask gives. Readers never see half an output, and a crash leaves the
previous version in place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["atomic_path", "atomic_folder", "temporary_beside", "publish", "sha256_file", "write_text_atomic",
           "read_keys", "retrying", "pread_into", "pwrite_all", "consecutive_runs"]


def temporary_beside(path: Path, kind: str = "tmp") -> Path:
    """The temporary name an output is written under before it is published: hidden, beside it, per process."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def publish(tmp: Path, path: Path) -> Path:
    """Rename the finished file ``tmp`` over ``path``, synced and with the user's normal mode (some writers
    create their temporary file owner-only)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success publish it as ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` (a folder, replaced
    whole), else it is deleted. The folder gets the user's normal mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_beside(path)
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed run of this same process id
    staging.mkdir()
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if path.exists():
            old = temporary_beside(path, "old")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def retrying(read: Callable[[], T], attempts: int = 3, wait: float = 0.2) -> T:
    """``read()``, tried again after a short wait (doubling) when it fails with an I/O error, at most
    ``attempts`` times in all: a dropped connection or a busy server is often gone a moment later. A file that
    is not there is not waited for."""
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt + 1 == attempts:
                raise
            time.sleep(wait * 2**attempt)
    raise AssertionError("unreachable")


def read_keys(path: str | os.PathLike) -> list[str]:
    """Sample ids from a key file, one a line, surrounding white space dropped. A blank line is an error
    (``ValueError`` naming the line): it would shift every later key onto the wrong row."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"line {blank[0]} is blank" + (f" (and {len(blank) - 1} more)" if len(blank) > 1 else "")
                         + "; every line must hold one sample id")
    return [line.strip() for line in lines]


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


def consecutive_runs(positions):
    """(lo, hi) index ranges of ``positions`` (a 1-D integer array) whose values run consecutively: one read or
    write each."""
    import numpy as np

    if len(positions) == 0:
        return iter(())
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(positions)].tolist())
