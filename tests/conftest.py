import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest


def write_image(path, size=(12, 10), color=None, mode="RGB", seed=0):
    """A small real image file (format from the suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    if color is not None:
        array[:] = color
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode=None)
    image.save(path)
    return path


def pytest_configure(config):
    """Child processes write their scratch into one folder that the session removes when it ends, not into
    /tmp: torchrun keeps a torchelastic_* folder there per launch and leaves it behind when a test kills it.
    Set before collection, so the environments that test modules copy at import have it too."""
    tempfile.gettempdir()  # this process keeps the usual one (pytest's own tmp_path tree)
    config.children_scratch = (tempfile.mkdtemp(prefix="labelkit-test-children-"), os.environ.get("TMPDIR"))
    os.environ["TMPDIR"] = config.children_scratch[0]


def pytest_unconfigure(config):
    scratch, before = config.children_scratch
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def image_tree(tmp_path):
    """An ImageNet-style tree: class folders with nested files, mixed formats."""
    root = tmp_path / "train"
    files = ["cat/a.png", "cat/b.JPG", "cat/sub/c.jpeg", "dog/d.webp", "dog/e.bmp", "emu/f.png"]
    for i, rel in enumerate(files):
        write_image(root / rel, seed=i)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _make_handler(root, counter):
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        """A static file server that honours ``Range: bytes=a-b`` (as S3, the Hub and CDNs do) and counts the
        body bytes it sends, so tests can check how much of a file a command read."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def send_head(self):
            path = self.translate_path(self.path)
            if os.path.isdir(path) or "Range" not in self.headers:
                return super().send_head()
            if counter.get("no_range"):
                return super().send_head()
            try:
                handle = open(path, "rb")
            except OSError:
                self.send_error(404)
                return None
            size = os.fstat(handle.fileno()).st_size
            spec = self.headers["Range"].split("=", 1)[1].split(",")[0].strip()
            first, _, last = spec.partition("-")
            if first == "":
                start, end = max(0, size - int(last)), size - 1
            else:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                handle.close()
                return None
            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            handle.seek(start)
            self._remaining = end - start + 1
            return handle

        def copyfile(self, source, outputfile):
            remaining = getattr(self, "_remaining", None)
            self._remaining = None
            while remaining is None or remaining > 0:
                block = source.read(1 << 16 if remaining is None else min(1 << 16, remaining))
                if not block:
                    break
                if counter.get("fail_after") is not None and counter["sent"] >= counter["fail_after"]:
                    counter["fail_after"] = None  # drop the connection once, mid-body
                    raise ConnectionResetError("test server: connection dropped")
                outputfile.write(block)
                counter["sent"] += len(block)
                counter["requests_bytes"].append(len(block))
                if remaining is not None:
                    remaining -= len(block)

    return Handler


@pytest.fixture
def http_root(tmp_path):
    """A folder served over http://127.0.0.1:PORT/ by a Range-capable server; yields (root, base_url,
    counter) where counter["sent"] is the number of body bytes served so far."""
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()
    counter = {"sent": 0, "requests_bytes": [], "fail_after": None}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(root, counter))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()


def cli(*args):
    """``labelkit ARGS`` in-process (each argument turned into a string), as click's test runner gives it."""
    from click.testing import CliRunner

    from labelkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def shapes(tmp_path):
    """48 small PNGs in 3 class folders."""
    root = tmp_path / "shapes"
    for i in range(48):
        write_image(root / f"class{i % 3}" / f"img_{i:03d}.png", size=(8, 8), color=(i % 3) * 100, seed=i)
    return root
