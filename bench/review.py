"""How fast `labelkit review` pages render in a real browser (headless Chromium), and screenshots of them.

Run: .venv/bin/python bench/review.py ARTEFACT [--data SPEC] [--head H] [--shots DIR] [--repeat 3]
     .venv/bin/python bench/review.py --random 100000 --clusters 1000 --data FOLDER [--shots DIR]

With --random N, the artefact is made here: N samples of --data (its first N ids) with random labels of
--clusters clusters and random scores, to time the pages at a size no run on this machine makes quickly.
For each page (the overview sorted by size, a cluster page) it prints the time from navigation until every
thumbnail in view is drawn, first with no thumbnail cached and then cached, and the session's start.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


_IN_VIEW_DRAWN = """const done = arguments[arguments.length - 1];
const wait = () => { const shown = [...document.images].filter(i => i.getBoundingClientRect().top < innerHeight);
  if (shown.every(i => i.complete)) done(performance.now()); else setTimeout(wait, 5); };
wait();"""


def _load_ms(browser, url: str) -> float:
    """Milliseconds from navigation to the page drawn with every thumbnail in view decoded."""
    browser.get(url)
    return browser.execute_async_script(_IN_VIEW_DRAWN)


def _random_artefact(data: str, n: int, k: int, out: Path) -> Path:
    from labelkit.artefact import Artefact
    from labelkit.data import resolve

    source = resolve(data)
    if len(source) < n:
        raise SystemExit(f"{data} holds {len(source):,} samples, fewer than --random {n:,}")
    rng = np.random.default_rng(0)
    ids = sorted(source.ids)[:n]
    path = out / "random.parquet"
    Artefact.build(ids, rng.integers(0, k, n), k, scores=rng.random((1, n)).astype(np.float32),
                   data={"spec": data}, method={"name": "random labels for bench/review.py"}).write(path)
    return path


def main() -> None:
    from labelkit.review import ReviewSession, serve

    parser = argparse.ArgumentParser()
    parser.add_argument("artefact", nargs="?")
    parser.add_argument("--data", default=None)
    parser.add_argument("--head", type=int, default=None)
    parser.add_argument("--random", type=int, default=None)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--shots", default=None)
    parser.add_argument("--name", default="review")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="review-bench-"))
    artefact = args.artefact or _random_artefact(args.data, args.random, args.clusters, work)
    started = time.perf_counter()
    session = ReviewSession(str(artefact), work / "review", data=args.data, head=args.head)
    print(f"{artefact}: {session.state.labels.size:,} samples, K = {session.state.k}; session ready in "
          f"{time.perf_counter() - started:.2f} s")
    server = serve(session, "bench", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    biggest = int(np.argmax(session.sizes))
    pages = {"overview": f"{base}/?token=bench&sort=size&desc=1",
             "cluster page": f"{base}/cluster/{biggest}?token=bench"}
    browser = _browser()
    try:
        for name, url in pages.items():
            cold = _load_ms(browser, url)
            warm = sorted(_load_ms(browser, url) for _ in range(args.repeat))
            print(f"  {name}: {cold:.0f} ms with no thumbnail cached, {warm[len(warm) // 2]:.0f} ms cached "
                  f"(median of {args.repeat})")
            if args.shots:
                Path(args.shots).mkdir(parents=True, exist_ok=True)
                shot = Path(args.shots) / f"{args.name}-{name.split()[0]}.png"
                browser.save_screenshot(str(shot))
                print(f"  screenshot {shot}")
    finally:
        browser.quit()
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
