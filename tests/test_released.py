"""`labelkit import sela:NAME`: the released SeLa labels through a cache, served here by a local HTTP server."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from labelkit.artefact import released as released
from labelkit.cli import main
from labelkit.errors import ImportSourceError
from labelkit.artefact import imagefolder_keys, import_labels


@pytest.fixture
def mirror(http_root, tmp_path, monkeypatch):
    """The release site served from a local folder, a fresh cache, and releases shrunk to test size."""
    root, base, counter = http_root
    monkeypatch.setenv("LABELKIT_SELA_MIRROR", base)
    monkeypatch.setenv("LABELKIT_CACHE", str(tmp_path / "cache"))

    def shrink(name, **shape):
        monkeypatch.setitem(released.RELEASES, name, dataclasses.replace(released.RELEASES[name], **shape))
        return released.RELEASES[name]

    return root, counter, shrink


def test_catalogue_names_the_files_of_the_official_repository():
    assert released.release("sela:resnet50-10x3k").url == (
        "http://www.robots.ox.ac.uk/~vgg/research/self-label/asset/new_models/resnet50-10x3k_pp.pth")
    assert released.release("alexnet-10x3k-csv").filename == "alexnet-labels.csv"
    assert released.release("sela:resnet-10x3k-csv").filename == "resnet-labels.csv"
    for item in released.RELEASES.values():
        assert item.samples == 1_281_167 and (item.heads, item.k) in ((10, 3000), (1, 1000))
    with pytest.raises(ImportSourceError, match="sela:resnet50-10x3k"):
        released.release("sela:resnet51")


def test_checkpoint_release_is_downloaded_once_and_verified(mirror, image_tree, tmp_path):
    root, counter, shrink = mirror
    item = shrink("resnet50-10x3k", samples=6, heads=2, k=5)
    labels = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4]])
    (root / "new_models").mkdir()
    src = root / "new_models" / "resnet50-10x3k_pp.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(5, 8)}, "labels": labels, "epoch": 280}, src)
    art = import_labels("sela:resnet50-10x3k", image_root=str(image_tree))
    order = imagefolder_keys(image_tree)
    for i, key in enumerate(order):
        assert art.labels(1)[list(art.sample_ids).index(key)] == labels[1, i]
    method = art.metadata["method"]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert method["source"] == "sela:resnet50-10x3k" and method["sha256"] == digest
    assert method["url"] == item.url and [h.k for h in art.heads] == [5, 5]
    cached = tmp_path / "cache" / "sela" / "resnet50-10x3k_pp.pth"
    assert (cached.with_name(cached.name + ".sha256").read_text().split()[0]) == digest
    served = counter["sent"]
    again = import_labels("sela:resnet50-10x3k", image_root=str(image_tree))
    assert again.artefact_id == art.artefact_id and counter["sent"] == served  # from the cache
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")
    with pytest.raises(ImportSourceError, match="differs from the .* recorded when it was downloaded"):
        import_labels("sela:resnet50-10x3k", image_root=str(image_tree))


def test_a_dropped_download_resumes_where_it_stopped(mirror, tmp_path):
    root, counter, shrink = mirror
    item = shrink("resnet50-1k", samples=400_000, heads=1, k=1000)
    (root / "new_models").mkdir()
    src = root / "new_models" / "resnet50-1k_pp.pth"
    torch.save({"labels": torch.randint(0, 1000, (400_000,))}, src)
    size = src.stat().st_size
    counter["fail_after"] = size // 2
    seen = []
    path, digest = released.fetch(item, progress=lambda done, total: seen.append((done, total)))
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert counter["sent"] < 1.2 * size  # the second request asked only for the rest
    resumed = [done for done, total in seen if total == size]
    assert resumed and seen[-1] == (size, size)


def test_offline_says_which_url_to_fetch_and_where_to_put_it(monkeypatch, tmp_path, image_tree):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LABELKIT_SELA_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LABELKIT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["import", "sela:resnet50-10x3k", "--image-root", str(image_tree),
                                       "--out", str(tmp_path / "a.parquet")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"http://127.0.0.1:{port}/new_models/resnet50-10x3k_pp.pth" in result.output
    assert str(tmp_path / "cache" / "sela" / "resnet50-10x3k_pp.pth") in result.output
    assert not (tmp_path / "a.parquet").exists()


IDS = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in (1440764, 1443537) for i in (10, 7, 23)]
LABELS = np.array([[0, 4, 2, 3, 1, 2], [4, 4, 0, 1, 2, 3], [1, 0, 2, 2, 3, 4]])  # 3 heads x 6 samples


def _layouts():
    narrow = [",".join(map(str, row)) for row in LABELS.T]
    wide = [",".join(map(str, row)) for row in LABELS]
    return {
        "rows, no header": "\n".join(narrow),
        "rows, pandas index and header": ",0,1,2\n" + "\n".join(f"{i},{r}" for i, r in enumerate(narrow)),
        "rows, numbered header": "0,1,2\n" + "\n".join(narrow),
        "rows, semicolons": "\n".join(r.replace(",", ";") for r in narrow),
        "rows, tabs and head names": "h0\th1\th2\n" + "\n".join(r.replace(",", "\t") for r in narrow),
        "heads as lines": "\n".join(wide),
        "heads as lines, named": "\n".join(f"head{h},{r}" for h, r in enumerate(wide)),
        "heads as lines, pandas": ",0,1,2,3,4,5\n" + "\n".join(f"{h},{r}" for h, r in enumerate(wide)),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_csv_release_layouts_are_sniffed(mirror, tmp_path, layout):
    root, _, shrink = mirror
    shrink("alexnet-10x3k-csv", samples=6, heads=3, k=5)
    (root / "alexnet-labels.csv").write_text(_layouts()[layout] + "\n")
    keys = tmp_path / "ids.txt"
    keys.write_text("\n".join(IDS) + "\n")
    art = import_labels("sela:alexnet-10x3k-csv", keys=str(keys))
    for h in range(3):
        got = dict(zip(art.sample_ids, art.labels(h)))
        assert [got[i] for i in IDS] == list(LABELS[h]), layout
    assert art.metadata["method"]["layout"]


def test_csv_release_with_file_names_needs_no_image_root(mirror):
    root, _, shrink = mirror
    shrink("resnet-10x3k-csv", samples=6, heads=3, k=5)
    lines = ["path,h0,h1,h2"] + [f"/scratch/imagenet/train/{i}," + ",".join(map(str, LABELS[:, j]))
                                 for j, i in enumerate(IDS)]
    (root / "resnet-labels.csv").write_text("\n".join(lines) + "\n")
    art = import_labels("sela:resnet-10x3k-csv")
    assert sorted(art.sample_ids) == sorted(IDS)  # ImageNet file ids, as an image folder names them


@pytest.mark.parametrize("content,message", [
    ("3,1\n2,2\n", r"should hold 3 head\(s\) x 6 samples; found shape \(2, 2\)"),
    ("\n".join(",".join(map(str, row)) for row in (LABELS.T + 3)), r"must lie in 0..4; found 3..7"),
])
def test_a_csv_that_is_not_the_release_fails_clearly(mirror, tmp_path, content, message):
    root, _, shrink = mirror
    shrink("alexnet-10x3k-csv", samples=6, heads=3, k=5)
    (root / "alexnet-labels.csv").write_text(content + "\n")
    keys = tmp_path / "ids.txt"
    keys.write_text("\n".join(IDS) + "\n")
    with pytest.raises(ImportSourceError, match=message):
        import_labels("sela:alexnet-10x3k-csv", keys=str(keys))


def test_two_imports_at_once_download_once_and_a_wrong_file_is_never_the_reference(mirror, tmp_path):
    import threading

    root, counter, shrink = mirror
    item = shrink("resnet50-1k", samples=200_000, heads=1, k=1000)
    (root / "new_models").mkdir()
    src = root / "new_models" / "resnet50-1k_pp.pth"
    torch.save({"labels": torch.randint(0, 1000, (200_000,))}, src)
    results, errors = [], []

    def fetch():
        try:
            results.append(released.fetch(item))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    assert errors == [] and [digest for _, digest in results] == [expected, expected]
    assert counter["sent"] == src.stat().st_size  # one download; the second import waited and found the file
    pinned = shrink("resnet18-1k", samples=200_000, heads=1, k=1000, size=123)  # the catalogue's size differs
    (root / "new_models" / "resnet18-1k_pp.pth").write_bytes(src.read_bytes())
    with pytest.raises(ImportSourceError, match="is not the released file .*where the release has 123"):
        released.fetch(pinned)
    cache = tmp_path / "cache" / "sela"
    assert not (cache / "resnet18-1k_pp.pth").exists() and not (cache / "resnet18-1k_pp.pth.sha256").exists()
