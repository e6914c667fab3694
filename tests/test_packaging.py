import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_cli_and_schemas_inside_labelkit(tmp_path):
    # `pip install .` must not install generic top-level `cli` or `schemas` packages
    import shutil

    source = tmp_path / "src"  # built from a copy: setuptools leaves build/ and *.egg-info where it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "labelkit", "cli", "schemas"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    before = sorted(p.name for p in ROOT.iterdir())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(source), "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing left in the working tree
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("labelkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"labelkit", next(t for t in tops if t.endswith(".dist-info"))}
    assert "labelkit/schemas/artefact-metadata-v1.schema.json" in names
    assert "labelkit/cli/__init__.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "labelkit = labelkit.cli:run" in entry


def test_the_declared_python_floor_has_what_the_library_imports():
    """--config x.toml reads with tomllib, which Python has from 3.11: a lower floor installs and then fails."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    floor = re.search(r'requires-python = ">=3\.(\d+)"', (root / "pyproject.toml").read_text())
    uses_tomllib = any("import tomllib" in p.read_text() for p in (root / "labelkit").rglob("*.py"))
    assert floor and (not uses_tomllib or int(floor.group(1)) >= 11)
