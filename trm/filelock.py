"""Exclusive locks that hold across the hosts sharing a filesystem: ``flock`` (local disks, and NFS,
where Linux maps it onto the server's locks). The lock is the kernel's, tied to the open file, so a
killed holder releases it; the file keeps the holder's host, pid and start time for the messages.
On a filesystem without locks (Lustre mounted without ``flock``) a warning is printed and the work
goes on unlocked."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from trm.errors import InputError


class LockHeld(InputError):
    """Another process holds the lock; the message names it."""


def _holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "a process that has not written its name yet"


@contextlib.contextmanager
def exclusive(guarded: str | Path, what: str, wait: bool, log=print):
    """Hold the exclusive lock of ``guarded`` (a file or folder, which need not exist) for the
    ``with`` block: the file ``.<name>.lock`` beside it, created with its folder.

    Held by another process: with ``wait``, log one line naming ``what`` and the holder and wait
    for it; without, raise :class:`LockHeld` naming both."""
    guarded = Path(guarded)
    path = guarded.parent / f".{guarded.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if _lock(f, path, what, wait, log):
            f.seek(0)
            f.truncate()
            since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            f.write(f"host {socket.gethostname()} pid {os.getpid()} since {since}\n")
            f.flush()
        yield


def _lock(f, path: Path, what: str, wait: bool, log) -> bool:
    """Lock the open file ``f``; False where the filesystem has no locks."""
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            if not wait:
                raise LockHeld(f"{what} is in use by {holder} (lock {path})") from None
            log(f"waiting for {holder}, which holds {what} (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        print(f"warning: {path.parent} does not support file locks ({e.strerror}); {what} is not locked", file=sys.stderr)
        return False
    return True
