"""Run the experiment queue in jobs.txt.

Each job is a line ``[ ] command`` and is known by its command text, not by its line number, so
``jobs.txt`` may be edited while runners work on it. The marker says the state: ``[ ]`` open,
``[~]`` running, ``[x]`` done (exit 0), ``[!]`` failed. Beside the file, ``jobs.txt.state.json``
records for each job its state, host, runner and job process ids, the job's process group, start
and end time (UTC), exit code, GPUs, heartbeat and log path; the log (``job.log``, appended on each
attempt) lives in the job's run directory (``+run_name=NAME`` -> ``runs/NAME/``, or ``run_dir=...``).

Every change to the two files happens under a lock (``jobs.txt.lock``), so several runners (one
per GPU group or per host, on a shared filesystem) never take the same job.

Each job runs under a small supervisor process that leads the job's own session and process group
(``sh -c``, an environment prefix, torchrun and its workers all belong to the job) and ends last.
When the runner dies, even by SIGKILL, or is stopped (SIGTERM, SIGINT, SIGHUP), the supervisor
sends the job's processes SIGTERM (a training job saves a checkpoint and stops), waits ``--grace``
seconds, then sends SIGKILL to every process left below it; a second stop signal skips the wait.
Processes a job leaves behind when its command ends are stopped the same way. A job stopped with
its runner (exit status not 0) is opened again; the runner exits 128 + the signal's number.

A runner that is killed leaves its job *stale*, which any runner detects: the runner's process is
gone (same host), or the heartbeat, refreshed every 30 s, is older than ``--stale-after`` (any
host). Stale and failed jobs are reported, never skipped silently: the runner exits 1 while any
remain; ``--retry-stale`` / ``--retry-failed`` queue them again. ``--retry-stale`` never starts a
job while a process of its earlier attempt lives (its process group, on this host): it waits up to
``--grace`` seconds, then leaves it stale and says so in one line. A job whose run had finished
reruns harmlessly: the training command says the run is finished and changes nothing.

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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """State, parent pid and process group of ``pid`` from /proc; None once it has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid, pgid = f.read().rsplit(")", 1)[1].split()[:3]  # after the name, which may hold anything
    except (OSError, ValueError):
        return None
    return state, int(ppid), int(pgid)


def processes() -> dict[int, tuple[int, int]]:
    """Every live process of this host, pid -> (parent pid, process group). Zombies are left out:
    they have ended, whoever has yet to reap them (a container's init may never do it)."""
    if not os.path.isdir("/proc"):  # not Linux: ps says the same
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True).stdout
        rows = (line.split()[:4] for line in out.splitlines())
        return {int(pid): (int(ppid), int(pgid)) for pid, ppid, pgid, state in rows if not state.startswith("Z")}
    stats = {int(entry): _stat(entry) for entry in os.listdir("/proc") if entry.isdigit()}
    return {pid: (st[1], st[2]) for pid, st in stats.items() if st and st[0] not in "ZX"}


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    if not os.path.isdir("/proc"):
        return True
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` on this host."""
    return sorted(pid for pid, (_, group) in processes().items() if group == pgid)


def below(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """The processes of ``table`` descending from ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        found += (new := children.get(todo.pop(), []))
        todo += new
    return found


def _kill(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # ended meanwhile
            pass


def _become_subreaper() -> None:
    """Make orphans of the job (processes whose parent ended: torchrun's workers, each in a session
    of its own, when torchrun dies) children of this process instead of init's, so that every
    process of the job stays below it (Linux; elsewhere they escape)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap(job: int, status: int | None) -> int | None:
    """Reap every ended child (the job's orphans are ours too); the job's exit status once known."""
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == job:
            status = os.waitstatus_to_exitcode(raw)


def _stop_reason(requests: list[str], runner_pid: int, status: int | None) -> str | None:
    """Why the supervisor stops the job now, or None while it runs."""
    if requests:
        return f"{requests[0]} received"
    if os.getppid() != runner_pid:
        return f"the runner (pid {runner_pid}) is gone"
    return None if status is None else "its command ended, leaving processes"


def supervise(command: str, runner_pid: int, grace: float) -> int:
    """Run ``command`` under ``sh -c`` as this process's child, stopping the job's processes when a
    stop signal comes, when the runner ``runner_pid`` is gone (this process then has another
    parent) or when the command ends leaving processes behind: SIGTERM to the job's process group
    (this process leads it; a shell chain, an environment prefix and torchrun's agent are in it,
    and torchrun hands the signal to its workers) and to orphans of the job, then, ``grace``
    seconds later or at a further stop signal, SIGKILL to every process below this one. This
    process ends last, so the job's group lives while any of its processes does. Returns the
    command's exit status (128 + N when signal N ended it)."""
    _become_subreaper()
    requests: list[str] = []
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, _: requests.append(signal.Signals(signum).name))
    me = os.getpid()
    job = os.posix_spawn("/bin/sh", ["sh", "-c", command], os.environ)
    status = deadline = None
    while True:
        status = _reap(job, status)
        if deadline is None:
            why = _stop_reason(requests, runner_pid, status)
            if why is None:
                time.sleep(0.1)
                continue
            if status is not None and not below(me, processes()):
                break
            print(f"==> {now()} {why}: SIGTERM to the job, SIGKILL to what is left after {grace:g} s", flush=True)
            table, asked = processes(), len(requests)
            _kill([p for p in below(me, table) if table[p][1] == me or table[p][0] == me], signal.SIGTERM)
            deadline = time.monotonic() + grace
        else:
            left = below(me, processes())
            if not left and status is not None:
                break
            if len(requests) > asked or time.monotonic() > deadline:
                _kill(left, signal.SIGKILL)
            time.sleep(0.25)
    return status if status >= 0 else 128 - status


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
        if record.get("host") == self.host and not alive(record.get("runner_pid")):
            live = self.live_processes(record)
            job = f"its processes (group {record.get('pgid')}: pids {live}) are being stopped" if live else "so is its job"
            return f"its runner (pid {record.get('runner_pid')}) on {self.host} is gone; {job}"
        beat = record.get("heartbeat")
        if beat and time.time() - datetime.fromisoformat(beat).timestamp() > self.stale_after:
            return f"no heartbeat since {beat} (runner pid {record.get('runner_pid')} on {record.get('host')})"
        return None

    def live_processes(self, record: dict) -> list[int]:
        """The live processes of the job's attempt that ``record`` describes, if on this host: its
        process group, which its supervisor leads until the last of them ends (a record of an older
        runner, without a group: its pid)."""
        if record.get("host") != self.host:
            return []
        if record.get("pgid"):
            return group_members(record["pgid"])
        return [record["pid"]] if alive(record.get("pid")) else []

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

    def requeue(self, which: str, wait_s: float = 0.0) -> list[str]:
        """Open again every stale (``which='stale'``) or failed job; returns their commands. A stale
        job is never opened while a process of its earlier attempt lives on this host: it is waited
        for up to ``wait_s`` seconds, then left stale and named in one line."""
        end = time.monotonic() + wait_s
        while which == "stale" and time.monotonic() < end and \
                any(r["stale"] and self.live_processes(r) for r in self.status()):  # fmt: skip
            time.sleep(0.2)
        with self.locked():
            records, again = self.records(), []
            for _, state, command in parse(self.path):
                r = records.get(command, {})
                stale = which == "stale" and state == "running" and self.stale_reason(r)
                if stale and (live := self.live_processes(r)):
                    print(f"not re-queued: {run_name(command)}: its earlier attempt still has processes on {self.host} "
                          f"after {wait_s:g} s (group {r.get('pgid')}: pids {live}); they get SIGKILL at the end of their "
                          f"grace period, at once with kill -TERM {r.get('pid')}", file=sys.stderr)  # fmt: skip
                elif stale or (which == "failed" and state == "failed"):
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
                    "pgid": None, "started": now(), "heartbeat": now(), "ended": None, "exit_code": None,
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


def start(queue: Queue, command: str, record: dict, grace: float) -> subprocess.Popen:
    """Start the job's supervisor (:func:`supervise`) in a session of its own, whose process group
    the job joins; its input is empty (no job waits on a terminal)."""
    log = Path(record["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if record["gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = record["gpus"]
    supervisor = [sys.executable, str(Path(__file__).resolve()), f"--supervise={command}", f"--runner-pid={os.getpid()}",
                  f"--grace={grace}"]  # fmt: skip
    with open(log, "a") as f:
        f.write(f"==> {record['started']} {queue.host} attempt {record['attempts']}: {command}\n")
        f.flush()
        proc = subprocess.Popen(supervisor, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    queue.update(command, pid=proc.pid, pgid=proc.pid, grace=grace)
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
    signals: list[int] = []  # stop signals received: each is handed to the jobs' supervisors
    previous = {s: signal.signal(s, lambda signum, _: signals.append(signum)) for s in STOP_SIGNALS}
    started = failed = handed = 0
    try:
        while True:
            while free and not signals and not (args.one and started):
                job = queue.claim(args.only, free[0])
                if job is None:
                    break
                command, record = job
                print(f"==> {run_name(command)}: {command} (log {record['log']})", flush=True)
                running[start(queue, command, record, args.grace)] = (command, free.pop(0))
                started += 1
            if not running:
                break
            if len(signals) > handed:  # the first stops the jobs, a further one skips their grace period
                print(f"!! {signal.Signals(signals[-1]).name}: stopping {len(running)} job(s) (SIGTERM, SIGKILL after "
                      f"{args.grace:g} s{'' if handed else '; again to skip the wait'})", file=sys.stderr, flush=True)  # fmt: skip
                _kill([proc.pid for proc in running], signal.SIGTERM)
                handed = len(signals)
            for proc in list(running):
                code = proc.poll()
                if code is None:
                    continue
                command, gpus = running.pop(proc)
                free.append(gpus)
                if signals and code != 0:  # stopped with the runner: it resumes at the next start
                    queue.update(command, state="open", exit_code=code, ended=now(), stopped=signal.Signals(signals[0]).name)
                    print(f"<== stopped (exit {code}), re-queued: {command}", flush=True)
                    continue
                queue.update(command, state="done" if code == 0 else "failed", exit_code=code, ended=now())
                failed += code != 0
                print(f"<== exit {code}: {command}", flush=True)
            time.sleep(0.2)
    finally:
        stop.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
    left = [r for r in queue.status() if r["stale"] or r["state"] == "failed"]
    for r in left:
        why = f"stale ({r['stale']}), --retry-stale re-queues it" if r["stale"] else \
            f"failed (exit {r.get('exit_code')}), --retry-failed re-queues it; log {r.get('log')}"
        print(f"!! {r['name']}: {why}", file=sys.stderr)
    return 128 + signals[0] if signals else 1 if failed or left else 0


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
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds a stopped job gets between SIGTERM and SIGKILL; --retry-stale waits as long for the "
                        "processes of an earlier attempt")  # fmt: skip
    p.add_argument("--supervise", metavar="COMMAND", help=argparse.SUPPRESS)  # a job's supervisor (start())
    p.add_argument("--runner-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.grace < 0:
        p.error(f"--grace must be at least 0, not {args.grace:g}")
    if args.supervise is not None:
        sys.exit(supervise(args.supervise, args.runner_pid, args.grace))
    queue = Queue(args.file, args.stale_after)
    try:
        if not args.file.is_file():
            raise QueueError(f"{args.file}: no such jobs file")
        if args.list:
            show(queue)
            return
        for which, asked in (("stale", args.retry_stale), ("failed", args.retry_failed)):
            if asked and not args.dry_run:
                for command in queue.requeue(which, args.grace if which == "stale" else 0.0):
                    print(f"re-queued ({which}): {command}")
        code = run(queue, args)
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before any job ran (waiting for a lock or for --retry-stale)
        sys.exit(128 + signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    main()
