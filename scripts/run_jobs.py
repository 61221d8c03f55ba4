"""Run the experiment queue in jobs.txt, one job at a time.

Each job line is ``[ ] command``. A runner claims the first open job (marking it ``[~]``), runs it
in a shell from the repository root, and marks it ``[x]`` when it exits 0 or ``[!]`` otherwise.
Claims go through a lock file, so several runners (one per node or allocation) can share a queue.

    python scripts/run_jobs.py                 # run open jobs until none is left
    python scripts/run_jobs.py --one           # run one job (for a batch scheduler's job script)
    python scripts/run_jobs.py --list          # show the queue
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = re.compile(r"^\[(?P<state>[ x~!])\] (?P<command>.+)$")


def parse(text: str) -> list[tuple[int, str, str]]:
    """(line number, state, command) of every job line; comments and blank lines are skipped."""
    jobs = []
    for n, line in enumerate(text.splitlines()):
        m = JOB.match(line)
        if m:
            jobs.append((n, m["state"], m["command"]))
        elif line.strip() and not line.lstrip().startswith("#"):
            raise ValueError(f"line {n + 1} is neither a job ('[ ] command') nor a comment: {line!r}")
    return jobs


@contextmanager
def locked(path: Path):
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mark(path: Path, line_no: int, state: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line_no] = f"[{state}]" + lines[line_no][3:]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def claim(path: Path) -> tuple[int, str] | None:
    with locked(path):
        for n, state, command in parse(path.read_text()):
            if state == " ":
                mark(path, n, "~")
                return n, command
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=ROOT / "jobs.txt")
    p.add_argument("--one", action="store_true", help="run a single job, then stop")
    p.add_argument("--list", action="store_true", help="print the queue and exit")
    args = p.parse_args()
    if args.list:
        for _, state, command in parse(args.file.read_text()):
            print(f"[{state}] {command}")
        return
    failed = 0
    while (job := claim(args.file)) is not None:
        n, command = job
        print(f"==> {command}", flush=True)
        code = subprocess.call(command, shell=True, cwd=ROOT)
        with locked(args.file):
            mark(args.file, n, "x" if code == 0 else "!")
        failed += code != 0
        if args.one:
            break
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
