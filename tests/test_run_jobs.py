"""The jobs.txt queue runner (scripts/run_jobs.py), run as a user runs it: a separate process."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "run_jobs.py"


def job(tmp_path, name: str, code: str) -> str:
    """A job line's command: python running ``code``, its run directory in tmp_path."""
    return f"{sys.executable} -c {json.dumps(code)} run_dir={tmp_path / 'runs' / name}"


def runner(jobs: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--file", str(jobs), *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def records(jobs: Path) -> dict:
    return json.loads(jobs.with_name(jobs.name + ".state.json").read_text())


def wait_for(predicate, timeout: float = 30.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_states_records_and_retry_of_a_failed_job(tmp_path):
    fixed = tmp_path / "fixed"
    ok = job(tmp_path, "ok", "print('hello from ok')")
    bad = job(tmp_path, "bad", f"import os, sys; print('bad run'); sys.exit(0 if os.path.exists({str(fixed)!r}) else 3)")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"# a comment\n[ ] {ok}\n\n[ ] {bad}\n")
    result = runner(jobs)
    assert result.returncode == 1 and "bad: failed (exit 3), --retry-failed" in result.stderr
    assert jobs.read_text() == f"# a comment\n[x] {ok}\n\n[!] {bad}\n"
    rec = records(jobs)
    assert (rec[ok]["state"], rec[ok]["exit_code"], rec[bad]["state"], rec[bad]["exit_code"]) == ("done", 0, "failed", 3)
    for r in rec.values():
        assert r["host"] and r["pid"] and r["runner_pid"] and r["started"] <= r["ended"] and r["attempts"] == 1
    assert Path(rec[ok]["log"]) == tmp_path / "runs" / "ok" / "job.log"
    assert "hello from ok" in Path(rec[ok]["log"]).read_text()
    assert runner(jobs).returncode == 1  # nothing open, the failure still reported
    fixed.touch()
    again = runner(jobs, "--retry-failed")
    assert again.returncode == 0 and "re-queued (failed)" in again.stdout
    assert jobs.read_text() == f"# a comment\n[x] {ok}\n\n[x] {bad}\n"
    assert records(jobs)[bad]["attempts"] == 2 and Path(records(jobs)[bad]["log"]).read_text().count("==> ") == 2


def test_two_runners_never_take_the_same_job(tmp_path):
    done = tmp_path / "done.txt"
    commands = [job(tmp_path, f"j{i}", f"import time; time.sleep(0.2); open({str(done)!r}, 'a').write('j{i}\\n')")
                for i in range(6)]  # fmt: skip
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"[ ] {c}\n" for c in commands))
    with open(tmp_path / "jobs.txt.lock", "a") as lock:  # held here: both runners wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        runners = [subprocess.Popen([sys.executable, str(SCRIPT), "--file", str(jobs)], stdout=subprocess.PIPE)
                   for _ in range(2)]  # fmt: skip
        time.sleep(1.0)
        assert jobs.read_text() == "".join(f"[ ] {c}\n" for c in commands) and not done.exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    outputs = [r.communicate(timeout=60)[0].decode() for r in runners]
    assert all(r.returncode == 0 for r in runners)
    assert sorted(done.read_text().split()) == [f"j{i}" for i in range(6)]  # each ran exactly once
    assert all(o.count("==> ") >= 1 for o in outputs)  # both took work
    assert jobs.read_text() == "".join(f"[x] {c}\n" for c in commands)


# A job's process: records its pid under its label (torchrun's workers add their rank), then, until
# the test creates "release", sleeps. It records each SIGTERM; then, like a training run saving its
# checkpoint, it exits 143 half a second later, or, with "ignore" in its label, sleeps on (SIGKILL
# needed).
WORKER = """
import os, signal, sys, time
from pathlib import Path
here, label = Path(sys.argv[0]).parent, sys.argv[1] + os.environ.get("RANK", "")
stopping = []
def on_term(*_):
    with open(here / "signals", "a") as f:
        f.write(f"TERM {label}\\n")
    stopping.append(time.monotonic())
signal.signal(signal.SIGTERM, on_term)
with open(here / "pids", "a") as f:
    f.write(f"{label} {os.getpid()}\\n")
while not (here / "release").exists():
    if stopping and "ignore" not in label and time.monotonic() - stopping[0] > 0.5:
        sys.exit(143)
    time.sleep(0.05)
"""


def worker(tmp_path) -> str:
    (tmp_path / "worker.py").write_text(WORKER)
    return f"{sys.executable} {tmp_path / 'worker.py'}"


def started(tmp_path) -> dict[str, int]:
    """label -> pid of the job's processes that have started."""
    pids = tmp_path / "pids"
    lines = pids.read_text().splitlines() if pids.exists() else []
    return {label: int(pid) for label, pid in map(str.split, lines)}


def live(pids, pgid: int) -> list[int]:
    """Those of ``pids``, and of process group ``pgid``, that run (zombies have ended)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, _, group = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state not in "ZX" and (int(entry) in pids or int(group) == pgid):
            found.append(int(entry))
    return found


# The job's processes, by label; under sh -c, dash forks each command instead of replacing itself.
JOBS = {
    "plain": ("{w} term", ["term"]),
    "env-sh-chain": ("env X=1 sh -c '{w} term-bg & {w} ignore; {w} after' run_dir={runs}/chain", ["term-bg", "ignore"]),
    "torchrun": ("env OMP_NUM_THREADS=1 {py} -m torch.distributed.run --standalone --nproc-per-node 2 {script} term-rank",
                 ["term-rank0", "term-rank1"]),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(JOBS))
def test_a_killed_runner_stops_every_process_of_its_job_and_leaves_it_stale_until_retried(tmp_path, kind):
    """SIGKILL the runner: every process of the job gets SIGTERM once (directly, or from torchrun's
    agent), those that ignore it SIGKILL after the grace period, and none is left; the job is stale
    until --retry-stale runs it to the end."""
    text, labels = JOBS[kind]
    command = text.format(w=worker(tmp_path), script=tmp_path / "worker.py", py=sys.executable, runs=tmp_path / "runs")
    command += f" run_dir={tmp_path / 'runs' / kind}"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"[ ] {command}\n")
    grace = 4.0  # a margin for the processes that stop at SIGTERM (in half a second) on a busy machine
    first = subprocess.Popen([sys.executable, str(SCRIPT), "--file", str(jobs), "--grace", str(grace)], stdout=subprocess.DEVNULL)
    pids = wait_for(lambda: (p := started(tmp_path)).keys() == set(labels) and p, timeout=60)
    pgid = records(jobs)[command]["pgid"]
    assert pgid == records(jobs)[command]["pid"] and os.getpgid(pgid) == pgid
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = time.monotonic()
    wait_for(lambda: not live(set(pids.values()) | {pgid}, pgid), timeout=grace + 20)
    assert sorted((tmp_path / "signals").read_text().splitlines()) == sorted(f"TERM {label}" for label in labels)
    assert ("ignore" in labels) == (time.monotonic() - killed > grace)  # SIGKILL waited for the grace period
    assert jobs.read_text() == f"[~] {command}\n"
    listed = runner(jobs, "--list").stdout
    assert "stale" in listed and "is gone; so is its job" in listed
    plain = runner(jobs)
    assert plain.returncode == 1 and "stale" in plain.stderr and "--retry-stale" in plain.stderr
    (tmp_path / "release").touch()
    retried = runner(jobs, "--retry-stale")
    assert retried.returncode == 0 and "re-queued (stale)" in retried.stdout
    assert jobs.read_text() == f"[x] {command}\n" and records(jobs)[command]["attempts"] == 2


def test_retry_stale_never_starts_a_job_while_its_earlier_attempt_lives(tmp_path):
    command = f"env X=1 sh -c '{worker(tmp_path)} ignore' run_dir={tmp_path / 'runs' / 'stubborn'}"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"[ ] {command}\n")
    first = subprocess.Popen([sys.executable, str(SCRIPT), "--file", str(jobs), "--grace", "120"], stdout=subprocess.DEVNULL)
    (pid,) = wait_for(lambda: started(tmp_path), timeout=60).values()
    first.send_signal(signal.SIGKILL)
    first.wait()
    supervisor = records(jobs)[command]["pid"]
    began = time.monotonic()
    refused = runner(jobs, "--retry-stale", "--grace", "1")
    assert refused.returncode == 1 and time.monotonic() - began >= 1
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("not re-queued")]
    assert f"group {supervisor}: pids [" in line and str(pid) in line and f"kill -TERM {supervisor}" in line
    assert jobs.read_text() == f"[~] {command}\n" and list(started(tmp_path)) == ["ignore"]  # not started again
    os.kill(supervisor, signal.SIGTERM)  # as the line says: SIGKILL at once
    wait_for(lambda: not live({pid, supervisor}, supervisor), timeout=10)
    (tmp_path / "release").touch()
    assert runner(jobs, "--retry-stale", "--grace", "1").returncode == 0 and jobs.read_text() == f"[x] {command}\n"


def test_a_stopped_runner_stops_its_job_and_opens_it_again(tmp_path):
    command = f"{worker(tmp_path)} term run_dir={tmp_path / 'runs' / 'stopped'}"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"[ ] {command}\n")
    first = subprocess.Popen([sys.executable, str(SCRIPT), "--file", str(jobs), "--grace", "30"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    pids = wait_for(lambda: started(tmp_path), timeout=60)
    pgid = records(jobs)[command]["pgid"]
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 128 + signal.SIGTERM and "!! SIGTERM: stopping 1 job(s)" in err
    assert not live(set(pids.values()) | {pgid}, pgid)  # the runner waited for them
    assert (tmp_path / "signals").read_text() == "TERM term\n" and f"<== stopped (exit 143), re-queued: {command}" in out
    rec = records(jobs)[command]
    assert jobs.read_text() == f"[ ] {command}\n" and (rec["state"], rec["exit_code"], rec["stopped"]) == ("open", 143, "SIGTERM")
    (tmp_path / "release").touch()
    assert runner(jobs).returncode == 0 and jobs.read_text() == f"[x] {command}\n"


def test_a_line_edited_above_a_running_job_leaves_its_mark_right(tmp_path):
    release = tmp_path / "release"
    wait = f"import os, time; [time.sleep(0.05) for _ in iter(lambda: os.path.exists({str(release)!r}), True)]"
    waiting = job(tmp_path, "waiting", wait)
    added = job(tmp_path, "added", "pass")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"# queue\n[ ] {waiting}\n")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--file", str(jobs)], stdout=subprocess.DEVNULL)
    wait_for(lambda: jobs.read_text().startswith("# queue\n[~]"))
    jobs.write_text(f"# queue\n# a note added while it runs\n[ ] {added}\n\n[~] {waiting}\n# tail\n")
    release.touch()
    assert proc.wait(timeout=60) == 0
    assert jobs.read_text() == f"# queue\n# a note added while it runs\n[x] {added}\n\n[x] {waiting}\n# tail\n"


def test_dry_run_assigns_gpus_and_changes_nothing(tmp_path):
    commands = [job(tmp_path, name, "pass") for name in ("E1v2-a", "E1v2-b", "E0v2")]
    jobs = tmp_path / "jobs.txt"
    text = "".join(f"[ ] {c}\n" for c in commands)
    jobs.write_text(text)
    out = runner(jobs, "--dry-run", "--gpus", "0,1,2,3", "--gpus-per-job", "2", "--max-parallel", "2", "--only", "E1v2*")
    assert out.returncode == 0
    assert out.stdout.splitlines() == [f"would run E1v2-a on CUDA_VISIBLE_DEVICES=0,1: {commands[0]}",
                                       f"would run E1v2-b on CUDA_VISIBLE_DEVICES=2,3: {commands[1]}"]  # fmt: skip
    assert jobs.read_text() == text and not jobs.with_name("jobs.txt.state.json").exists()


def test_parallel_jobs_get_their_own_gpus(tmp_path):
    seen = tmp_path / "seen"
    code = f"import os, time; open({str(seen)!r}, 'a').write(os.environ['CUDA_VISIBLE_DEVICES'] + '\\n'); time.sleep(0.5)"
    commands = [job(tmp_path, f"g{i}", code + f"  # {i}") for i in range(2)]
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"[ ] {c}\n" for c in commands))
    began = time.time()
    assert runner(jobs, "--gpus", "0,1", "--gpus-per-job", "1", "--max-parallel", "2").returncode == 0
    assert sorted(seen.read_text().split()) == ["0", "1"] and time.time() - began < 0.5 * 2 + 5
    assert {records(jobs)[c]["gpus"] for c in commands} == {"0", "1"}


@pytest.mark.parametrize("text, message", [("[ ] a\nnot a job\n", "jobs.txt:2: neither a job"),
                                           ("[ ] a\n[ ] a\n", "jobs.txt:2: the same command as line 1")])  # fmt: skip
def test_a_bad_jobs_file_is_named_with_its_line(tmp_path, text, message):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(text)
    out = runner(jobs)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1
    assert jobs.read_text() == text
