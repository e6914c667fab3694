"""The label sets released with the SeLa paper, by name: ``sela:resnet50-10x3k`` and friends.

Each name maps to a file of the official repository (yukimasano/self-label), downloaded once into a cache
(resumable, sha256 recorded beside it and checked on every later use) and then read like any local file.
The ImageNet training set has 1,281,167 images; every release labels all of them.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .._util.files import publish, sha256_file
from ..errors import ImportSourceError

__all__ = ["Release", "RELEASES", "release", "cache_dir", "fetch", "IMAGENET_TRAIN"]

IMAGENET_TRAIN = 1_281_167
_ASSET = "http://www.robots.ox.ac.uk/~vgg/research/self-label/asset/"


@dataclass(frozen=True)
class Release:
    name: str
    path: str  # under the asset root; the URL is mirror + path
    description: str
    heads: int
    k: int
    samples: int = IMAGENET_TRAIN
    size: int | None = None  # bytes of the released file, where known: a download of another size is refused
    sha256: str | None = None  # its hash, where known (fill in once a download has been checked by hand)

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        # a mirror (a lab's own copy, an internal proxy) replaces the asset root, keeping the file paths
        return os.environ.get("LABELKIT_SELA_MIRROR", _ASSET).rstrip("/") + "/" + self.path


RELEASES = {
    r.name: r
    for r in [
        Release("resnet50-10x3k", "new_models/resnet50-10x3k_pp.pth",
                "ResNet-50 [3000 x 10], better augmentations (NMI 75.7): checkpoint with 'labels'", 10, 3000),
        Release("resnet50-1k", "new_models/resnet50-1k_pp.pth",
                "ResNet-50 [1000 x 1], better augmentations (NMI 65.7): checkpoint with 'labels'", 1, 1000),
        Release("resnet18-1k", "new_models/resnet18-1k_pp.pth",
                "ResNet-18 [1000 x 1], better augmentations (NMI 62.7): checkpoint with 'labels'", 1, 1000),
        Release("resnet-10x3k-csv", "resnet-labels.csv",
                "the best ResNet model [3000 x 10] of the paper, labels as CSV", 10, 3000),
        Release("alexnet-10x3k-csv", "alexnet-labels.csv",
                "the best (raw) AlexNet [3000 x 10] of the paper, labels as CSV", 10, 3000),
    ]
}


def release(name: str) -> Release:
    """The release called ``name`` (with or without the ``sela:`` prefix)."""
    key = name.split(":", 1)[1] if name.startswith("sela:") else name
    if key not in RELEASES:
        raise ImportSourceError(f"sela:{key} is not a released SeLa label set; known: "
                                + ", ".join(f"sela:{n}" for n in RELEASES))
    return RELEASES[key]


def cache_dir() -> Path:
    """``$LABELKIT_CACHE``, else ``$XDG_CACHE_HOME/labelkit``, else ``~/.cache/labelkit``."""
    if os.environ.get("LABELKIT_CACHE"):
        return Path(os.environ["LABELKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labelkit"


def _download(url: str, part: Path, progress: Callable[[int, int | None], None] | None, timeout: float) -> None:
    """Append ``url`` to ``part`` from where a previous attempt stopped (HTTP Range), calling
    ``progress(done, total)`` as bytes arrive."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and done:  # nothing left to fetch: the part is whole
            return
        raise
    with response:
        resumed = response.status == 206
        if done and not resumed:  # the server ignores Range: start again
            done = 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as handle:
            if progress:
                progress(done, total)
            while block := response.read(1 << 20):
                handle.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    if total is not None and done != total:
        raise urllib.error.URLError(f"connection closed after {done:,} of {total:,} bytes")


def fetch(item: Release, *, progress: Callable[[int, int | None], None] | None = None,
          timeout: float = 60.0, retries: int = 3) -> tuple[Path, str]:
    """The cached copy of a release and its sha256, downloading it first if needed.

    The first complete download records its sha256 in ``FILE.sha256``; every later use re-hashes the file
    and refuses one that no longer matches. A broken download is resumed where it stopped (``FILE.part``).
    Offline, the error says which URL to fetch and where to put the file.
    """
    folder = cache_dir() / "sela"
    folder.mkdir(parents=True, exist_ok=True)
    with _download_lock(folder / f".{item.filename}.lock"):  # a second process waits, then finds the file
        return _fetch_locked(item, folder / item.filename, progress, timeout, retries)


@contextlib.contextmanager
def _download_lock(path: Path):
    """Hold ``path`` exclusively (waiting for another holder): two imports of one release never append to one
    ``.part`` file. The operating system drops the lock when its process ends."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _fetch_locked(item: Release, target: Path, progress, timeout: float, retries: int) -> tuple[Path, str]:
    record = target.with_name(target.name + ".sha256")
    if target.is_file():
        digest = sha256_file(target)
        if record.is_file():
            expected = record.read_text().split()[0]
            if digest != expected:
                raise ImportSourceError(
                    f"{target}: sha256 {digest[:16]}… differs from the {expected[:16]}… recorded when it was "
                    f"downloaded (corrupt or replaced); delete it to download {item.url} again")
        else:  # placed there by hand: record it now, so that later uses are checked against this copy
            record.write_text(f"{digest}  {item.filename}\n")
        return target, digest
    part = target.with_name(target.name + ".part")
    error = None
    for _ in range(retries):
        try:
            _download(item.url, part, progress, timeout)
            error = None
            break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # resumable: try again from where it stopped
            error = exc
            if isinstance(exc, urllib.error.HTTPError) or "Connection refused" in str(exc) \
                    or "Name or service not known" in str(exc) or "nodename nor servname" in str(exc):
                break  # not a dropped connection: retrying will not help
    if error is not None:
        reason = getattr(error, "reason", None) or error
        kept = f"; {part.stat().st_size:,} bytes kept in {part} for the next try" if part.exists() else ""
        raise ImportSourceError(f"sela:{item.name}: cannot download {item.url} ({reason}){kept}. Offline, fetch "
                                f"that URL by other means and put the file at {target}") from None
    digest = sha256_file(part)
    _check_pins(item, part, digest)
    publish(part, target)  # the part file is the download's own resumable temporary name
    record.write_text(f"{digest}  {item.filename}\n")
    return target, digest



def _check_pins(item: Release, part: Path, digest: str) -> None:
    """A download that is not the released file (another size or hash, where the catalogue knows them) is
    deleted and refused, never recorded as the reference copy."""
    size = part.stat().st_size
    wrong = (f"{size:,} bytes where the release has {item.size:,}" if item.size is not None and size != item.size
             else f"sha256 {digest[:16]}… where the release has {item.sha256[:16]}…"
             if item.sha256 is not None and digest != item.sha256 else None)
    if wrong:
        part.unlink()
        raise ImportSourceError(f"sela:{item.name}: the download from {item.url} is not the released file "
                                f"({wrong}); it was deleted. Is the mirror serving another file?")
