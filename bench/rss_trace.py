"""Where a command's processes peak: run it, sample the resident memory of it and of every process below it (a
torchrun's ranks, named by their RANK) every quarter second, write the samples, print each process's peak and
when it came.

Run: .venv/bin/python bench/rss_trace.py /tmp/trace.log -- .venv/bin/python -m torch.distributed.run \
         --standalone --nproc_per_node=4 -m labelkit generate --data TABLE ...

The log has one line a sample: seconds since the start, pid, RSS in MB, rank ('-' outside torchrun). Sampling
misses peaks shorter than a quarter second; the kernel's own peak (``os.wait4``, what bench/scale.py and
bench/torchrun_table.py report) does not.
"""

import os
import subprocess
import sys
import time
from pathlib import Path


def descendants(root: int) -> list[int]:
    found, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                children = [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
                found += children
                frontier += children
        except OSError:  # the process ended meanwhile
            pass
    return found


def sample(pid: int) -> tuple[float, str] | None:
    """(RSS in MB, RANK) of a process, or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    rss = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS")), None)
    rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), "-")
    return None if rss is None else (rss, rank)


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    log, command = Path(sys.argv[1]), sys.argv[3:]
    child = subprocess.Popen(command)
    began, peaks = time.time(), {}
    with log.open("w") as out:
        while child.poll() is None:
            now = time.time() - began
            for pid in descendants(child.pid):
                seen = sample(pid)
                if seen is None:
                    continue
                out.write(f"{now:.2f} {pid} {seen[0]:.0f} {seen[1]}\n")
                if seen[0] > peaks.get(pid, (0.0,))[0]:
                    peaks[pid] = (seen[0], now, seen[1])
            out.flush()
            time.sleep(0.25)
    for pid, (rss, when, rank) in sorted(peaks.items()):
        print(f"pid {pid} (rank {rank}): peak {rss / 1024:.2f} GB at {when:.1f} s", file=sys.stderr)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
