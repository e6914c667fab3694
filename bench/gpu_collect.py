"""Merge bench/gpu.sh's parts into one gpu.json (no torch: it runs after every step, hung or not).

Run: python bench/gpu_collect.py PARTS_DIR [PART.json ...] [--junit junit.xml] --json OUT.json [--markdown OUT.md]

PARTS_DIR/steps.tsv holds a row per step (name, exit code, seconds); each PART.json (missing when its step
timed out or failed early) goes in under its file name's stem; the JUnit XML of the tests step is summarised.
--markdown also writes the figures as README-ready tables, with the card's name and the commands.
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


def _cell(value, fmt="{}") -> str:
    return "—" if value is None else fmt.format(value)


def markdown(merged: dict) -> str:
    """The figures as tables; a part that is missing (its step failed or timed out) says so."""
    env = merged.get("env", {})
    card = env.get("gpu") or "no GPU (smoke run on the CPU)"
    lines = [f"GPU figures on **{card}** ({env.get('nvidia_smi') or '—'}), torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, labelkit {env.get('labelkit')} at {(env.get('commit') or '?')[:10]}; "
             "`bench/gpu.sh OUTDIR`.", ""]
    lines += ["| step | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {s['exit']}{' (timed out)' if s['timed_out'] else ''} | {s['seconds']:.1f} |"
              for name, s in merged.get("steps", {}).items()]
    tests = merged.get("tests")
    if tests and "total" in tests:
        lines += ["", f"Tests (`pytest -m gpu tests/test_gpu.py`): {tests['passed']} passed, {len(tests['failed'])} "
                  f"failed, {tests['skipped']} skipped in {tests['seconds']:.0f} s"
                  + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else "") + "."]
    step = merged.get("label-step")
    if step and "solves" in step:
        names = {"logits_cold": "from logits, first solve in the process", "logits_again": "from logits, again",
                 "logits_warm": "from logits, warm-started after a 1 % change of the head",
                 "features_cold": "from features", "features_warm": "from features, warm-started",
                 "features_stream": "from features, kernel streamed"}
        lines += ["", f"Label step, N = {step['n']:,}, K = {step['k']}, D = {step['d']}, λ = {step['lam']:g} "
                  "(`bench/gpu.py label-step`):", "",
                  "| solve | seconds | iterations | kernel | peak GPU memory |", "| --- | --- | --- | --- | --- |"]
        for key, label in names.items():
            s = step["solves"].get(key)
            if s:
                lines.append(f"| {label} | {s['seconds']:.3f} | {s['iterations']} | {s['kernel']} | "
                             f"{_cell(s['peak_gb'], '{} GB')} |")
        paper = step.get("paper_loop", {})
        if paper:
            how = ("converged" if paper["converged"] else
                   f"scaled from {paper['iterations']} to {paper['iterations_needed']} iterations")
            lines.append(f"| the paper's float64 loop, same card | {paper['seconds']:.3f} | "
                         f"{paper['iterations_needed']} ({how}) | float64 N × K | {_cell(paper.get('peak_gb'), '{} GB')} |")
            agree = step["agreement"].get("paper_vs_labelkit")
            lines += ["", f"Ratio to the paper's loop: **{step['speedup_cold']}× cold, {step['speedup_warm']}× warm**; "
                      f"labels {_cell(agree and 100 * agree, '{:.3f}')} % equal to the paper's; goal ≤ 2 s cold from "
                      f"logits: {'met' if step['goal_cold_logits_2s'] else 'not met'}."]
    tp = merged.get("throughput")
    if tp and "loader" in tp:
        archs = [a for a in ("resnet50", "alexnet") if a in tp]
        lines += ["", f"Training throughput, images/s, {tp['image_size']} px, [{tp['heads']}] heads, batch "
                  f"{tp[archs[0]]['batch'] if archs else '?'} (`bench/gpu.py throughput`); "
                  f"{tp['jpegs']['count']:,} JPEGs of {tp['jpegs']['width']} × {tp['jpegs']['height']}, "
                  f"{tp['jpegs']['mean_kb']} kB on average:", "",
                  "| | " + " | ".join(archs) + " |", "| --- |" + " --- |" * len(archs)]
        rows = [("synthetic tensors (the model's ceiling)", lambda a: tp[a]["synthetic"]["images_per_s"]),
                ("synthetic, cuDNN autotuner on", lambda a: tp[a].get("synthetic_cudnn_benchmark", {}).get("images_per_s")),
                (f"loader + training ({tp['workers']} workers)", lambda a: tp[a]["loader_and_training"]["images_per_s"])]
        for label, get in rows:
            lines.append(f"| {label} | " + " | ".join(_cell(get(a), "{:,.0f}") for a in archs) + " |")
        for workers, part in tp["loader"].items():
            lines.append(f"| loader alone, {workers} workers | " + " | ".join(
                _cell(part["images_per_s"], "{:,.0f}") for _ in archs) + " |")
        lines.append("| bound by | " + " | ".join(
            tp[a].get("bottleneck", "—") + (f" (short by {tp[a]['loader_short_by']}×)" if tp[a].get("loader_short_by") else "")
            for a in archs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("parts", nargs="*")
    parser.add_argument("--junit", default=None)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", default=None)
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
    outputs = [(Path(args.json), json.dumps(merged, indent=1) + "\n")]
    if args.markdown:
        outputs.append((Path(args.markdown), markdown(merged)))
    for out, text in outputs:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)


if __name__ == "__main__":
    main()
