"""Run the experiment queue in jobs.txt.

Each job is a line ``[ ] command`` and is known by its command text, not by its line number, so
``jobs.txt`` may be edited while runners work on it. The marker says the state: ``[ ]`` open,
``[~]`` running, ``[x]`` done (exit 0), ``[!]`` failed. Beside the file, ``jobs.txt.state.json``
records for each job its state, host, runner and job process ids, start and end time (UTC), exit
code, GPUs, heartbeat and log path; the log (``job.log``, appended on each attempt) lives in the
job's run directory (``+run_name=NAME`` -> ``runs/NAME/``, or ``run_dir=...``).

Every change to the two files happens under a lock (``jobs.txt.lock``), so several runners (one
per GPU group or per host, on a shared filesystem) never take the same job. A runner that is
killed leaves its job *stale*, which any runner detects: the runner's and the job's processes are
gone (same host), or the heartbeat, refreshed every 30 s, is older than ``--stale-after`` (any
host); the job itself gets SIGTERM when its runner dies (Linux), so a training job saves a
checkpoint and stops. Stale and failed jobs are reported, never skipped silently: the runner exits
1 while any remain; ``--retry-stale`` / ``--retry-failed`` queue them again. A job whose run had
finished reruns harmlessly: the training command says the run is finished and changes nothing.

    python scripts/run_jobs.py                          # run open jobs until none is left
    python scripts/run_jobs.py --max-parallel 4 --gpus-per-job 1    # 4 one-GPU jobs at a time
    python scripts/run_jobs.py --only 'E1v2*' --dry-run # what would run, and on which GPUs
    python scripts/run_jobs.py --list                   # the queue with each job's record
    python scripts/run_jobs.py --retry-stale            # re-queue jobs of dead runners, then run
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = re.compile(r"^\[(?P<state>[ x~!])\] (?P<command>.+?)\s*$")
STATES = {" ": "open", "~": "running", "x": "done", "!": "failed"}
MARKERS = {name: marker for marker, name in STATES.items()}
HEARTBEAT_S = 30.0


class QueueError(Exception):
    """A jobs file that cannot be used; the message names the file and line."""


def parse(path: Path) -> list[tuple[int, str, str]]:
    """(line index, state name, command) of every job line of ``path``."""
    jobs, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines()):
        m = JOB.match(line)
        if m:
            if m["command"] in seen:
                raise QueueError(f"{path}:{n + 1}: the same command as line {seen[m['command']] + 1}; a job is "
                                 "known by its command, so make them differ (e.g. by +run_name=...)")  # fmt: skip
            seen[m["command"]] = n
            jobs.append((n, STATES[m["state"]], m["command"]))
        elif line.strip() and not line.lstrip().startswith("#"):
            raise QueueError(f"{path}:{n + 1}: neither a job ('[ ] command') nor a comment: {line!r}")
    return jobs


def run_name(command: str) -> str:
    """The run a command trains: its +run_name= (or run_dir=) value, else its experiment=."""
    words = shlex.split(command)
    for key in ("+run_name=", "run_name=", "run_dir=", "experiment="):
        for w in words:
            if w.startswith(key):
                return Path(w[len(key) :]).name
    return "job"


def log_path(command: str) -> Path:
    for w in shlex.split(command):
        if w.startswith("run_dir="):
            return ROOT / w[len("run_dir=") :] / "job.log"
    return ROOT / "runs" / run_name(command) / "job.log"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Queue:
    """jobs.txt and its state file; every method that reads and writes takes the lock."""

    def __init__(self, path: Path, stale_after: float = 600.0):
        self.path, self.stale_after = path, stale_after
        self.state_path = path.with_name(path.name + ".state.json")
        self.lock_path = path.with_name(path.name + ".lock")
        self.host = socket.gethostname()

    @contextmanager
    def locked(self):
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> dict[str, dict]:
        if not self.state_path.is_file():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except ValueError as e:
            raise QueueError(f"{self.state_path}: not valid JSON ({e}); restore or delete it") from None

    def _write(self, records: dict[str, dict], marks: dict[str, str]) -> None:
        """Save ``records`` and set the marker of each command in ``marks`` (found by its text).
        jobs.txt is rewritten only for a marker (a heartbeat leaves it alone: no edit of it is
        overwritten meanwhile)."""
        files = [(self.state_path, json.dumps(records, indent=1))]
        if marks:
            lines = self.path.read_text().splitlines(keepends=True)
            for i, line in enumerate(lines):
                m = JOB.match(line.rstrip("\n"))
                if m and m["command"] in marks:
                    lines[i] = f"[{MARKERS[marks[m['command']]]}]" + line[3:]
            files.append((self.path, "".join(lines)))
        for target, text in files:
            tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)

    def stale_reason(self, record: dict) -> str | None:
        """Why a running job is stale, or None while its runner lives."""
        if record.get("host") == self.host and not alive(record.get("runner_pid")) and not alive(record.get("pid")):
            return f"its runner (pid {record.get('runner_pid')}) and job (pid {record.get('pid')}) on {self.host} are gone"
        beat = record.get("heartbeat")
        if beat and time.time() - datetime.fromisoformat(beat).timestamp() > self.stale_after:
            return f"no heartbeat since {beat} (runner pid {record.get('runner_pid')} on {record.get('host')})"
        return None

    def status(self) -> list[dict]:
        """Every job with its record, state and (for running jobs) stale reason."""
        with self.locked():
            records, jobs = self.records(), parse(self.path)
        out = []
        for _, state, command in jobs:
            r = dict(records.get(command, {}), command=command, state=state, name=run_name(command))
            r["stale"] = self.stale_reason(r) if state == "running" else None
            out.append(r)
        return out

    def requeue(self, which: str) -> list[str]:
        """Open again every stale (``which='stale'``) or failed job; returns their commands."""
        with self.locked():
            records, again = self.records(), []
            for _, state, command in parse(self.path):
                r = records.get(command, {})
                if (which == "failed" and state == "failed") or (which == "stale" and state == "running"
                                                                 and self.stale_reason(r)):  # fmt: skip
                    records[command] = {**r, "state": "open", "requeued": now()}
                    again.append(command)
            if again:
                self._write(records, {c: "open" for c in again})
        return again

    def claim(self, only: str | None, gpus: list[str]) -> tuple[str, dict] | None:
        """Mark the first open job (matching ``only``) running for this runner; None if none."""
        with self.locked():
            records = self.records()
            for _, state, command in parse(self.path):
                if state != "open" or (only and not matches(command, only)):
                    continue
                records[command] = record = {
                    "state": "running", "host": self.host, "runner_pid": os.getpid(), "pid": None,
                    "started": now(), "heartbeat": now(), "ended": None, "exit_code": None,
                    "log": str(log_path(command)), "gpus": ",".join(gpus) or None,
                    "attempts": records.get(command, {}).get("attempts", 0) + 1}  # fmt: skip
                self._write(records, {command: "running"})
                return command, record
        return None

    def update(self, command: str, **changes) -> None:
        """Change this job's record (and its marker, given ``state``); a job whose line was
        removed from the file keeps its record only."""
        with self.locked():
            records = self.records()
            records[command] = {**records.get(command, {}), **changes}
            self._write(records, {command: changes["state"]} if "state" in changes else {})


def matches(command: str, pattern: str) -> bool:
    return fnmatch.fnmatch(run_name(command), pattern) or f"experiment={pattern}" in shlex.split(command)


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the runner dies (Linux), so a killed runner's job stops
    (saving a checkpoint) instead of running on unaccounted."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start(queue: Queue, command: str, record: dict) -> subprocess.Popen:
    log = Path(record["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if record["gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = record["gpus"]
    with open(log, "a") as f:
        f.write(f"==> {record['started']} {queue.host} attempt {record['attempts']}: {command}\n")
        f.flush()
        proc = subprocess.Popen(command, shell=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # fmt: skip
    queue.update(command, pid=proc.pid)
    return proc


def gpu_pool(given: str | None) -> list[str]:
    """The GPUs this runner hands out: --gpus, else CUDA_VISIBLE_DEVICES, else those nvidia-smi lists."""
    if given:
        return [g for g in given.split(",") if g]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]


def show(queue: Queue) -> None:
    for r in queue.status():
        state = "stale" if r["stale"] else r["state"]
        where = f"{r.get('host')}:{r.get('pid')}" if r.get("host") else "-"
        print(f"[{MARKERS[r['state']]}] {state:8} {r['name']:32} {where:24} start {r.get('started') or '-'} "
              f"end {r.get('ended') or '-'} exit {r.get('exit_code', '-')} log {r.get('log') or '-'}")  # fmt: skip
        if r["stale"]:
            print(f"      stale: {r['stale']}")


def run(queue: Queue, args) -> int:
    """Run open jobs, up to ``--max-parallel`` at a time; returns the exit status."""
    pool = gpu_pool(args.gpus)
    slots = max(1, args.max_parallel)
    if args.gpus_per_job and len(pool) < args.gpus_per_job * slots:
        if len(pool) < args.gpus_per_job:
            raise QueueError(f"--gpus-per-job {args.gpus_per_job} but only {len(pool)} GPUs ({','.join(pool) or 'none'})")
        slots = len(pool) // args.gpus_per_job
    free = [pool[i * args.gpus_per_job : (i + 1) * args.gpus_per_job] for i in range(slots)] if args.gpus_per_job else [[]] * slots
    if args.dry_run:
        open_jobs = [r for r in queue.status() if r["state"] == "open" and (not args.only or matches(r["command"], args.only))]
        for i, r in enumerate(open_jobs[: 1 if args.one else None]):
            gpus = ",".join(free[i % len(free)])
            print(f"would run {r['name']}" + (f" on CUDA_VISIBLE_DEVICES={gpus}" if gpus else "") + f": {r['command']}")
        return 0
    running: dict[subprocess.Popen, tuple[str, list[str]]] = {}
    stop = threading.Event()

    def beat():  # heartbeats of this runner's jobs
        while not stop.wait(HEARTBEAT_S):
            for command, _ in list(running.values()):
                queue.update(command, heartbeat=now())

    threading.Thread(target=beat, daemon=True).start()
    started = failed = 0
    try:
        while True:
            while free and not (args.one and started):
                job = queue.claim(args.only, free[0])
                if job is None:
                    break
                command, record = job
                print(f"==> {run_name(command)}: {command} (log {record['log']})", flush=True)
                running[start(queue, command, record)] = (command, free.pop(0))
                started += 1
            if not running:
                break
            for proc in list(running):
                code = proc.poll()
                if code is None:
                    continue
                command, gpus = running.pop(proc)
                free.append(gpus)
                queue.update(command, state="done" if code == 0 else "failed", exit_code=code, ended=now())
                failed += code != 0
                print(f"<== exit {code}: {command}", flush=True)
            time.sleep(0.2)
    finally:
        stop.set()
    left = [r for r in queue.status() if r["stale"] or r["state"] == "failed"]
    for r in left:
        why = f"stale ({r['stale']}), --retry-stale re-queues it" if r["stale"] else \
            f"failed (exit {r.get('exit_code')}), --retry-failed re-queues it; log {r.get('log')}"
        print(f"!! {r['name']}: {why}", file=sys.stderr)
    return 1 if failed or left else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=ROOT / "jobs.txt")
    p.add_argument("--one", action="store_true", help="run a single job, then stop")
    p.add_argument("--list", action="store_true", help="print the queue with each job's record and exit")
    p.add_argument("--dry-run", action="store_true", help="print the jobs that would run (and their GPUs); change nothing")
    p.add_argument("--only", metavar="NAME", help="only jobs whose run name matches NAME (a glob) or experiment=NAME")
    p.add_argument("--max-parallel", type=int, default=1, help="jobs run at once by this runner")
    p.add_argument("--gpus-per-job", type=int, default=0, help="GPUs per job (CUDA_VISIBLE_DEVICES slices; 0: no assignment)")
    p.add_argument("--gpus", help="GPU ids to hand out (default: CUDA_VISIBLE_DEVICES, else all nvidia-smi lists)")
    p.add_argument("--retry-stale", action="store_true", help="re-queue jobs whose runner died, then run")
    p.add_argument("--retry-failed", action="store_true", help="re-queue failed jobs, then run")
    p.add_argument("--stale-after", type=float, default=600.0, help="seconds without heartbeat that make a job stale")
    args = p.parse_args(argv)
    queue = Queue(args.file, args.stale_after)
    try:
        if not args.file.is_file():
            raise QueueError(f"{args.file}: no such jobs file")
        if args.list:
            show(queue)
            return
        for which, asked in (("stale", args.retry_stale), ("failed", args.retry_failed)):
            if asked and not args.dry_run:
                for command in queue.requeue(which):
                    print(f"re-queued ({which}): {command}")
        code = run(queue, args)
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
