"""What the benches read back from a run directory: the plan's estimate beside what the run did."""

import json
from pathlib import Path


def plan_check(out: Path, ended: float) -> dict | None:
    """The plan's time estimate for the epochs and label steps the run in ``out`` trained (``--settle`` or the
    budget may end a run before its planned last epoch), beside the seconds from the start of planning (the
    probe included; the budget counts from there too) to ``ended`` (``time.time()`` when the command exited);
    None for plans without a per-epoch estimate (embedding tables)."""
    record = json.loads((Path(out) / "config.json").read_text())
    history = [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines()]
    estimate = (record.get("plan") or {}).get("estimate") or {}
    if "per_epoch_s" not in estimate or "fixed_s" not in estimate:
        return None
    epochs = max([r["epoch"] for r in history if r["type"] == "epoch"], default=0)
    steps = sum(r["type"] == "label_step" for r in history)
    expected = estimate["fixed_s"] + epochs * estimate["per_epoch_s"] + steps * estimate["per_label_step_s"]
    wall = ended - record["plan"]["planned_at"]
    return {"planned_s": estimate["seconds"], "planned_epochs": record["config"]["epochs"], "epochs": epochs,
            "label_steps": steps, "expected_s": expected, "wall_s": wall, "ratio": wall / expected,
            "stopped": next((r["message"] for r in history if r["type"] in ("settled", "budget")), None)}
