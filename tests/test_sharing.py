import json

import numpy as np
import pytest
import torch

from labelkit.artefact import Artefact
from labelkit.errors import ImportSourceError
from labelkit.artefact import export_artefact, imagefolder_keys, import_labels, summarize

TREE_ORDER = ["cat/a.png", "cat/b.JPG", "cat/sub/c.jpeg", "dog/d.webp", "dog/e.bmp", "emu/f.png"]


def test_imagefolder_keys_follow_torchvision_order(image_tree):
    from torchvision.datasets import ImageFolder

    keys = imagefolder_keys(image_tree)
    expected = [str(__import__("pathlib").Path(p).relative_to(image_tree).as_posix()) for p, _ in ImageFolder(str(image_tree)).samples]
    assert keys == expected
    assert sorted(keys) == sorted(TREE_ORDER)


@pytest.mark.parametrize("key", ["labels", "L"])
def test_import_released_checkpoint_with_image_root(tmp_path, image_tree, key):
    order = imagefolder_keys(image_tree)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [3, 3, 1, 1, 0, 0]], dtype=torch.long)
    src = tmp_path / "resnet-10x3k.pth"
    torch.save({key: labels, "epoch": 400}, src)
    art = import_labels(src, image_root=str(image_tree), clusters=4)
    assert [h.k for h in art.heads] == [4, 4]
    position = {sample_id: i for i, sample_id in enumerate(order)}
    for row, sample_id in enumerate(art.sample_ids):
        assert art.labels(0)[row] == labels[0, position[sample_id]]
        assert art.labels(1)[row] == labels[1, position[sample_id]]
    method = art.metadata["method"]
    assert method["name"] == "import" and method["source"] == "resnet-10x3k.pth"
    import hashlib

    assert method["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_import_count_mismatch_names_both_counts(tmp_path, image_tree):
    src = tmp_path / "labels.pth"
    torch.save({"labels": torch.zeros(2, 5, dtype=torch.long)}, src)
    with pytest.raises(ImportSourceError, match="has 5 labels per head but the key list has 6 samples"):
        import_labels(src, image_root=str(image_tree))


def test_import_never_executes_code_from_a_file(tmp_path, image_tree):
    import pickle

    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned','w').write('x')",))

    src = tmp_path / "evil.pth"
    src.write_bytes(pickle.dumps({"labels": Payload()}))
    with pytest.raises(ImportSourceError, match="weights_only=True"):
        import_labels(src, image_root=str(image_tree))
    assert not (tmp_path / "pwned").exists()


def test_import_needs_keys_for_positional_labels(tmp_path):
    src = tmp_path / "labels.pth"
    torch.save({"labels": torch.zeros(1, 3, dtype=torch.long)}, src)
    with pytest.raises(ImportSourceError, match="--image-root DIR .* or --keys FILE"):
        import_labels(src)


def test_import_csv_with_key_column_and_header(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text("path;head_0;head_1\nx/000002.jpg;1;0\nx/000001.jpg;0;2\n")
    art = import_labels(src)
    assert list(art.sample_ids) == ["x/000001.jpg", "x/000002.jpg"]
    assert art.labels(1).tolist() == [2, 0]


def test_import_csv_keeps_numeric_ids_as_strings(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text("sample_id,label\n000007,1\n000003,0\n")
    art = import_labels(src)
    assert list(art.sample_ids) == ["000003", "000007"]


def test_import_csv_heads_only_with_keys(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text("3\t1\n0\t2\n1\t1\n")
    keys = tmp_path / "keys.txt"
    keys.write_text("b.jpg\na.jpg\nc.jpg\n")
    art = import_labels(src, keys=str(keys))
    assert list(art.sample_ids) == ["a.jpg", "b.jpg", "c.jpg"]
    assert art.labels(0).tolist() == [0, 3, 1] and art.labels(1).tolist() == [2, 1, 1]


def test_import_csv_rejects_unknown_layout(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text("name,label,comment\na.jpg,1,hello\nb.jpg,0,bye\n")
    with pytest.raises(ImportSourceError, match="non-integer column"):
        import_labels(src)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ImportSourceError, match="empty CSV"):
        import_labels(empty)


def test_import_npy_and_blank_key_lines(tmp_path):
    src = tmp_path / "labels.npy"
    np.save(src, np.array([1, 0, 1]))
    keys = tmp_path / "keys.txt"
    keys.write_text("a\nb\nc\n")
    assert import_labels(src, keys=str(keys)).labels(0).tolist() == [1, 0, 1]
    keys.write_text("a\n\nc\n")
    with pytest.raises(ImportSourceError, match="line 2 is blank"):
        import_labels(src, keys=str(keys))
    np.save(src, np.array([0.5, 1.0, 2.0]))
    keys.write_text("a\nb\nc\n")
    with pytest.raises(ImportSourceError, match="must be integers"):
        import_labels(src, keys=str(keys))


def test_export_formats(tmp_path):
    art = Artefact.build(["b", "a", "c"], [[1, 0, 2], [0, 0, 1]], [3, 2])
    csv_path = export_artefact(art, "csv", tmp_path / "l.csv")
    assert csv_path.read_text().splitlines() == ['"sample_id","head_0","head_1"', '"a",0,0', '"b",1,0', '"c",2,1']
    back = import_labels(csv_path, clusters=3)
    assert back.labels(0).tolist() == art.labels(0).tolist()
    npy = np.load(export_artefact(art, "npy", tmp_path / "l.npy"))
    assert npy.tolist() == [[0, 1, 2], [0, 0, 1]] and npy.dtype == np.int32
    doc = json.loads(export_artefact(art, "json", tmp_path / "l.json").read_text())
    assert doc["sample_ids"] == ["a", "b", "c"] and doc["heads"]["head_1"] == [0, 0, 1]
    assert doc["metadata"]["artefact_id"] == art.artefact_id


def test_summary_counts_cluster_sizes():
    art = Artefact.build(["a", "b", "c", "d"], [0, 0, 0, 2], 4)
    head = summarize(art)["heads"][0]
    assert (head["size_min"], head["size_max"], head["empty"], head["k"]) == (0, 3, 2, 4)
