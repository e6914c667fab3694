"""Merge bench/gpu.sh's parts into one gpu.json (no torch: it runs after every step, hung or not).

Run: python bench/gpu_collect.py PARTS_DIR [PART.json ...] [--junit junit.xml] --json OUT.json

PARTS_DIR/steps.tsv holds a row per step (name, exit code, seconds); each PART.json (missing when its step
timed out or failed early) goes in under its file name's stem; the JUnit XML of the tests step is summarised.
"""

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def steps(folder: Path) -> dict:
    table = folder / "steps.tsv"
    rows = {}
    for line in table.read_text().splitlines() if table.exists() else []:
        name, code, seconds = line.split("\t")
        rows[name] = {"exit": int(code), "seconds": float(seconds), "timed_out": int(code) in (124, 137)}
    return rows


def junit_summary(path: Path) -> dict:
    """Counts, the failed tests' names and every test's time from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"total": len(cases), "passed": len(cases) - len(failed) - skipped, "failed": failed,
            "skipped": skipped, "seconds": float(suite.get("time", 0.0)),
            "cases": {c.get("name"): round(float(c.get("time", 0.0)), 2) for c in cases}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("parts", nargs="*")
    parser.add_argument("--junit", default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    merged = {"steps": steps(Path(args.folder))}
    if args.junit and Path(args.junit).is_file():
        try:
            merged["tests"] = junit_summary(Path(args.junit))
        except (ET.ParseError, AttributeError) as exc:  # a run killed while pytest wrote it
            merged["tests"] = {"error": f"{args.junit}: unreadable ({exc})"}
    for part in map(Path, args.parts):
        if part.is_file():
            try:
                merged[part.stem] = json.loads(part.read_text())
            except json.JSONDecodeError as exc:
                merged[part.stem] = {"error": f"{part}: unreadable ({exc})"}
    out = Path(args.json)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
