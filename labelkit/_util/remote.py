"""Local paths and fsspec URLs through one door.

Artefacts, shards and image folders may live at ``https://``, ``s3://``, ``gs://``, ``hf://datasets/…``,
``file://`` or any other fsspec URL. Reads go through fsspec (and pyarrow on top of it), so a Parquet footer
costs a range request rather than a download, and credentials come from wherever each filesystem looks for
them (environment, config files, ``huggingface-cli login``). Nothing here ever prints or stores a secret:
:func:`redact` is applied to every URL that ends up in a message or in provenance.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError
from .files import atomic_path

__all__ = ["is_url", "redact", "redact_all", "filesystem", "open_input", "atomic_output", "refuse_url",
           "METADATA_BLOCK", "STREAM_BLOCK"]

# A URL scheme of two or more letters: "C:\data" (a Windows drive) stays a path.
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]+)://", re.IGNORECASE)
# Bytes fetched per request: small for footers (info, validate), large for streaming whole columns.
METADATA_BLOCK = 64 * 1024
STREAM_BLOCK = 8 * 1024 * 1024

# The package each fsspec protocol needs, for the one-line message when it is missing.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
             "http": "aiohttp", "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://…`` strings (fsspec URLs, ``file://`` included); False for plain paths."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def redact(url: str) -> str:
    """``url`` without user, password or query string: safe to print, log and record in an artefact."""
    if not is_url(url):
        return str(url)
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_all(value):
    """A copy of a JSON-like value with every URL in it passed through :func:`redact`: provenance (configs,
    sources) may name presigned or token-carrying URLs, and an artefact is made to be shared."""
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_all(item) for item in value]
    return redact(value) if is_url(value) else value


def _protocol(url: str) -> str:
    return _SCHEME.match(url).group(1).lower()


def filesystem(url: str):
    """``(fs, path)`` for a URL; a missing optional package becomes one clear ``ImportError`` line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = _PACKAGES.get(_protocol(url), "the fsspec implementation for this protocol")
        raise ImportError(f"{redact(url)}: reading {_protocol(url)}:// URLs needs {package} "
                          f"(pip install {package}): {exc}") from None
    except ValueError as exc:  # unknown protocol
        raise ImportError(f"{redact(url)}: {exc}") from None


@contextlib.contextmanager
def open_input(path: str | os.PathLike, block_size: int = STREAM_BLOCK) -> Iterator[IO[bytes]]:
    """A seekable binary file for a local path or a URL. ``block_size`` is the size of each ranged read
    (fsspec's read-ahead), so footers can be read with a small one."""
    if not is_url(path):
        with open(path, "rb") as handle:
            yield handle
        return
    fs, fs_path = filesystem(path)
    with fs.open(fs_path, "rb", block_size=block_size, cache_type="readahead") as handle:
        yield handle


def is_http(path: str | os.PathLike) -> bool:
    return is_url(path) and _protocol(str(path)) in ("http", "https")


def is_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a directory; for URLs only filesystems that can list say so (not plain http)."""
    if not is_url(path):
        return Path(path).is_dir()
    if is_http(path):
        return str(path).endswith("/")
    fs, fs_path = filesystem(path)
    return fs.isdir(fs_path)


def join(base: str | os.PathLike, name: str) -> str | Path:
    if not is_url(base):
        return Path(base) / name
    return str(base).rstrip("/") + "/" + name


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A local temporary path to write one output file to, published as ``path`` when the block succeeds:
    renamed into place on a local disk, or uploaded whole to a URL through fsspec (one put: an object store
    shows the object complete or not at all). Nothing is published when the block fails."""
    if not is_url(path):
        with atomic_path(path) as tmp:
            yield tmp
        return
    if is_http(path):
        raise ConfigError(f"{redact(str(path))}: http(s) URLs are read-only here; write to a local path or an "
                          "s3://, gs://, az:// or hf:// URL")
    import tempfile

    try:
        fs, fs_path = filesystem(str(path))
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="labelkit-out-") as folder:
        tmp = Path(folder) / Path(fs_path).name
        yield tmp
        parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path.strip("/") else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)  # object stores have no folders: a no-op there
        fs.put_file(str(tmp), fs_path)


def refuse_url(path: str | os.PathLike, option: str, why: str) -> None:
    """One clear error for an output that must be local (a run directory, a report folder): never a local
    folder named after the URL's scheme."""
    if is_url(path) and _protocol(str(path)) != "file":
        raise ConfigError(f"{option} {redact(str(path))}: {why}")
