import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from labelkit.artefact import Artefact
from labelkit.cli import main
from labelkit.errors import DataError
from labelkit.report import TILE, build_report

from conftest import write_image


def _data(tmp_path, n=40):
    root = tmp_path / "images"
    for i in range(n):
        write_image(root / f"c{i % 4}" / f"{i:03d}.png", size=(10, 10), color=(i * 6 % 255, 40, 90))
    return root


def _page_files(index):
    text = index.read_text()
    return text, re.findall(r'src="([^"]+)"', text)


def test_report_references_only_existing_files_and_no_network(tmp_path):
    root = _data(tmp_path)
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    labels = np.array([int(i.split("/")[0][1]) for i in ids]) % 3
    art = Artefact.build(ids, labels, 3).write(tmp_path / "labels.parquet")
    report = build_report(art, str(root), tmp_path / "report", per_cluster=5, clusters=2)
    text, sources = _page_files(report.index)
    assert sources and all((tmp_path / "report" / s).is_file() for s in sources)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    grids = sorted((tmp_path / "report").glob("cluster_*.png"))
    assert grids
    for grid in grids:
        width, height = Image.open(grid).size
        assert width == 8 * TILE and height % TILE == 0
    assert "purity" in text and "NMI" in text  # folder classes are the ground truth


def test_report_without_truth_sorts_by_size_and_replaces_bad_images(tmp_path):
    root = tmp_path / "flat"
    for i in range(12):
        write_image(root / f"{i:02d}.png", seed=i)
    (root / "03.png").write_bytes(b"broken")
    ids = sorted(p.name for p in root.glob("*.png"))
    art = Artefact.build(ids, np.arange(12) % 2, 2).write(tmp_path / "l.parquet")
    report = build_report(art, str(root), tmp_path / "r", per_cluster=4)
    assert report.missing == ["03.png"]
    text, _ = _page_files(report.index)
    assert "All 2 clusters, largest first" in text and "purity" not in text


def test_report_errors_and_cli(tmp_path):
    root = _data(tmp_path, n=8)
    art = Artefact.build(["zzz.png"], [0], 1).write(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="none of the 1 labelled ids"):
        build_report(art, str(root), tmp_path / "r")
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    good = Artefact.build(ids, np.arange(8) % 2, 2).write(tmp_path / "g.parquet")
    result = CliRunner().invoke(main, ["report", str(good), "--data", str(root), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "index.html").is_file() and (tmp_path / "cli" / "histograms.png").is_file()
    assert CliRunner().invoke(main, ["report", str(good), "--data", str(root), "--out", str(tmp_path / "c2"),
                                     "--head", "3"]).exit_code == 2


def test_report_decodes_only_the_images_it_shows(tmp_path, monkeypatch):
    from labelkit.data import ArraySource, resolve

    source = resolve("builtin:digits")
    art = Artefact.build(source.ids, source.targets, 10).write(tmp_path / "d.parquet")
    calls = []
    original = ArraySource.load
    monkeypatch.setattr(ArraySource, "load", lambda self, i: calls.append(i) or original(self, i))
    build_report(art, "builtin:digits", tmp_path / "r", per_cluster=6)
    shown = len(list((tmp_path / "r").glob("cluster_*.png")))
    assert shown == 10 and 0 < len(calls) <= shown * 6 * 2  # the picks plus as many spares, never all 1,797


def test_report_on_shards_streams_once_and_decodes_only_the_shown(tmp_path, monkeypatch):
    import io

    import webdataset as wds

    import labelkit.data._shards as data_module

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as sink:
        for i in range(30):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(buffer, format="PNG")
            sink.write({"__key__": f"k{i:03d}", "png": buffer.getvalue(), "cls": i % 3})
    art = Artefact.build([f"k{i:03d}" for i in range(30)], np.arange(30) % 3, 3).write(tmp_path / "l.parquet")
    decoded = []
    original = data_module.decode_image
    monkeypatch.setattr(data_module, "decode_image", lambda b: decoded.append(1) or original(b))
    report = build_report(art, str(tmp_path / "s-000000.tar"), tmp_path / "r", per_cluster=2, clusters=2)
    assert report.index.is_file() and 0 < len(decoded) <= 2 * 2 * 2 * 3


def test_a_second_report_into_the_same_folder_draws_its_own_grids(tmp_path):
    root = _data(tmp_path)
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    first = Artefact.build(ids, np.arange(len(ids)) % 2, 2).write(tmp_path / "a.parquet")
    second = Artefact.build(ids, (np.arange(len(ids)) + 1) % 2, 2).write(tmp_path / "b.parquet")  # clusters swapped
    out = tmp_path / "report"
    build_report(first, str(root), out, per_cluster=4, clusters=2)
    drawn = (out / "cluster_00000.png").read_bytes()
    build_report(second, str(root), out, per_cluster=4, clusters=2)
    assert (out / "cluster_00000.png").read_bytes() != drawn  # cluster 0 now holds the other images
