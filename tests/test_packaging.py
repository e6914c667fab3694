import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_cli_and_schemas_inside_labelkit(tmp_path):
    # `pip install .` must not install generic top-level `cli` or `schemas` packages
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("labelkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"labelkit", next(t for t in tops if t.endswith(".dist-info"))}
    assert "labelkit/schemas/artefact-metadata-v1.schema.json" in names
    assert "labelkit/cli/__init__.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "labelkit = labelkit.cli:main" in entry
