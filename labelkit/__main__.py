"""``python -m labelkit`` behaves exactly like ``labelkit`` (launchers such as torchrun need it)."""

from labelkit.cli import run

if __name__ == "__main__":
    run(prog_name="labelkit")
