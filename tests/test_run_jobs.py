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


def test_a_killed_runner_leaves_its_job_stale_until_retried(tmp_path):
    attempts = tmp_path / "attempts"
    code = (f"import time; p = {str(attempts)!r}; open(p, 'a').write('x'); "
            "n = len(open(p).read()); time.sleep(120 if n == 1 else 0)")  # fmt: skip
    command = job(tmp_path, "long", code)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"[ ] {command}\n")
    first = subprocess.Popen([sys.executable, str(SCRIPT), "--file", str(jobs)], stdout=subprocess.DEVNULL)
    child = wait_for(lambda: jobs.with_name("jobs.txt.state.json").is_file() and records(jobs)[command].get("pid"))
    first.send_signal(signal.SIGKILL)
    first.wait()

    def gone():
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone)  # the job got SIGTERM with its runner's death
    assert jobs.read_text() == f"[~] {command}\n"
    listed = runner(jobs, "--list").stdout
    assert "stale" in listed and "are gone" in listed
    plain = runner(jobs)
    assert plain.returncode == 1 and "stale" in plain.stderr and "--retry-stale" in plain.stderr
    retried = runner(jobs, "--retry-stale")
    assert retried.returncode == 0 and "re-queued (stale)" in retried.stdout
    assert jobs.read_text() == f"[x] {command}\n" and attempts.read_text() == "xx"
    assert records(jobs)[command]["attempts"] == 2


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
