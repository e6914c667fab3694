"""An ImageNet-sized artefact (1,281,167 rows x 10 heads, K = 3000) over HTTP, and the released CSV layouts.

Run: .venv/bin/python bench/remote.py [--rows N]
Serves a temporary folder on 127.0.0.1 with the Range-capable test server (tests/conftest.py) and prints:
the bytes `labelkit info` and `validate` fetch (footer only) as a share of the file; the bytes and time of a
full read over HTTP against a local read (baseline, same process); whether `metrics --against` gives the same
numbers both ways; and the time to import a release-shaped CSV (rows x 10, and 10 lines x rows).
"""

import argparse
import http.server
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import _make_handler  # noqa: E402

from labelkit.artefact import released as released  # noqa: E402
from labelkit.artefact import Artefact, read_artefact, read_header  # noqa: E402
from labelkit.cli import main as cli  # noqa: E402
from labelkit.artefact import import_labels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_281_167)
    args = parser.parse_args()
    n = args.rows
    rng = np.random.default_rng(0)
    ids = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(rng.integers(0, 1000, n))]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = Artefact.build(ids, rng.integers(0, 3000, (10, n)), 3000, method={"name": "bench"})
        b = Artefact.build(ids, rng.integers(0, 3000, (10, n)), 3000, method={"name": "bench"})
        a.write(root / "a.parquet")
        b.write(root / "b.parquet")
        size = (root / "a.parquet").stat().st_size
        counter = {"sent": 0, "requests_bytes": [], "fail_after": None}
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(root, counter))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        print(f"artefact: {n:,} rows x 10 heads, {size / 1e6:.1f} MB")

        for command in (["info", f"{base}/a.parquet"], ["validate", f"{base}/a.parquet"]):
            counter["sent"] = 0
            t0 = time.perf_counter()
            result = CliRunner().invoke(cli, command)
            assert result.exit_code == 0, result.output
            print(f"labelkit {command[0]:<9} over http: {counter['sent']:>10,} bytes = "
                  f"{100 * counter['sent'] / size:.2f} % of the file, {time.perf_counter() - t0:.2f} s")
        assert read_header(f"{base}/a.parquet").num_rows == n

        t0 = time.perf_counter()
        local = read_artefact(root / "a.parquet")
        t_local = time.perf_counter() - t0
        counter["sent"] = 0
        t0 = time.perf_counter()
        over = read_artefact(f"{base}/a.parquet")
        t_http = time.perf_counter() - t0
        assert over.artefact_id == local.artefact_id
        print(f"full read: local {t_local:.2f} s, http {t_http:.2f} s ({t_http / t_local:.2f}x), "
              f"{counter['sent'] / size:.3f}x the file's bytes fetched")

        runner = CliRunner()
        m_local = runner.invoke(cli, ["metrics", str(root / "a.parquet"), "--against", str(root / "b.parquet"),
                                      "--json"])
        m_http = runner.invoke(cli, ["metrics", f"{base}/a.parquet", "--against", f"{base}/b.parquet", "--json"])
        same = json.loads(m_local.output) == json.loads(m_http.output)
        print(f"metrics --against over http equals local: {same} "
              f"(head 0 NMI {json.loads(m_http.output)['heads'][0]['nmi']:.6f})")
        server.shutdown()

        labels = rng.integers(0, 3000, (10, n))
        (root / "keys.txt").write_text("\n".join(ids) + "\n")
        for name, text in (("rows", lambda: "\n".join(",".join(map(str, r)) for r in labels.T.tolist())),
                           ("heads as lines", lambda: "\n".join(",".join(map(str, r)) for r in labels.tolist()))):
            (root / "alexnet-labels.csv").write_text(text() + "\n")
            cache = root / "cache" / "sela"
            cache.mkdir(parents=True, exist_ok=True)
            (root / "alexnet-labels.csv").replace(cache / "alexnet-labels.csv")
            for stale in cache.glob("*.sha256"):
                stale.unlink()
            import os

            os.environ["LABELKIT_CACHE"] = str(root / "cache")
            item = released.RELEASES["alexnet-10x3k-csv"]
            released.RELEASES["alexnet-10x3k-csv"] = type(item)(**{**item.__dict__, "samples": n})
            t0 = time.perf_counter()
            art = import_labels("sela:alexnet-10x3k-csv", keys=str(root / "keys.txt"))
            elapsed = time.perf_counter() - t0
            by_id = dict(zip(ids, range(n)))
            order = np.array([by_id[i] for i in art.sample_ids])
            assert (art.label_matrix() == labels[:, order]).all()
            print(f"import sela:alexnet-10x3k-csv, {name}: {elapsed:.1f} s, labels equal, "
                  f"layout: {art.metadata['method']['layout']}")


if __name__ == "__main__":
    main()
