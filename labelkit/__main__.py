"""``python -m labelkit`` behaves exactly like ``labelkit`` (launchers such as torchrun need it)."""

from labelkit.cli import main

if __name__ == "__main__":
    main(prog_name="labelkit")
