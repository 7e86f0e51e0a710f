"""One run at a time per output: a long job holds a lock on what it writes (a batch --output, a training
--output_dir, a tokenized --save_path) for as long as it runs, so that a second run started on the same output (a
double launch, an overlapping cron job) stops at once instead of repeating the first one's work.

    with hold_output_lock(args.output, "--output"):
        ...  # resume, generate, append

The lock is flock(2) on a file beside the output, `<output>.lock` (beside it, not inside: a --save_path folder is
replaced whole). The holder writes who it is into that file, JSON with pid, host, command line and start time, and a
refused run names it:

    error: --output out.csv: in use by pid 4242 on host-a since 2024-05-01T10:00:00+02:00 (python
    chatglm_multi_gpu_inference.py --output out.csv); wait for it to finish, or choose another --output

The kernel releases a flock when its process ends, however it ends, so a run killed with SIGKILL leaves no lock: the
next run takes it. What such a run leaves is the file, with the dead holder's record in it; that is harmless (a file
is not a lock, only a flock on it is) and the next holder overwrites it. A run that ends normally deletes the file
while it still holds the lock, and a run that locks a file checks that it is still the one at `<output>.lock`,
starting over if not: without that check, two runs could each hold a lock, one on the deleted file, one on its
successor.
"""

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from glm_tune.errors import UserError


def lock_path(path):
    """The lock file of an output `path`: `<path>.lock` beside it (symlinks and '..' resolved, so that every spelling
    of one output shares one lock)."""
    path = Path(path).resolve()
    return path.with_name(path.name + ".lock")


class OutputLock:
    """An exclusive, non-blocking lock on an output; acquire() raises UserError naming the holder when it is taken."""

    def __init__(self, path, what="--output"):
        self.path = Path(path)
        self.what = what
        self.file = lock_path(path)
        self._fd = None

    def acquire(self):
        while True:
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise UserError(f"{self.what} {self.path}: cannot create its lock file {self.file} "
                                f"({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(self._refusal(holder)) from None
            except BaseException:
                os.close(fd)
                raise
            if _is_current(fd, self.file):
                break
            os.close(fd)  # locked a file that its last holder deleted meanwhile: lock the one there now
        record = json.dumps(holder_record(), ensure_ascii=False).encode("utf-8") + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd

    def release(self):
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _is_current(fd, self.file):
                self.file.unlink()  # still holding the lock: see the module docstring
        except OSError:
            pass  # left behind, it only holds a record; the next holder overwrites it
        finally:
            os.close(fd)  # releases the flock

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _refusal(self, holder):
        if holder:
            command = " ".join(str(holder.get("command", "?")).split())  # one line, whatever its arguments hold
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')} "
                   f"({command})")
        else:
            who = f"another process (its record in {self.file} is not written yet)"
        return f"{self.what} {self.path}: in use by {who}; wait for it to finish, or choose another {self.what}"


@contextmanager
def hold_output_lock(path, what="--output"):
    """Hold the lock on output `path` for the block; UserError (one line naming the holder's pid, host, start time and
    command line) when another process holds it. `what` is the flag the user named the output with.

    In a job of several processes (torch.distributed initialized) every rank calls it, like a collective: rank 0 alone
    takes the lock, and a refusal raises the same UserError on every rank, so that none waits for a rank 0 that has
    left. Call it after the process group is up (otherwise every rank would try to take the lock for itself)."""
    lock = OutputLock(path, what)
    run_on_rank0(lock.acquire)
    try:
        yield lock
    finally:
        lock.release()  # nothing to do on the other ranks


def run_on_rank0(work):
    """work() on rank 0 alone, its result (picklable) on every rank; a UserError it raises is raised on every rank.
    Without torch.distributed initialized, simply work()."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return work()
    outcome = error = None
    if dist.get_rank() == 0:
        try:
            outcome = work()
        except Exception as err:  # whatever it is, the other ranks must hear of it
            error = err
    shared = [outcome, None if error is None else (isinstance(error, UserError), str(error))]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[1] is not None:
        is_user_error, message = shared[1]
        raise UserError(message) if is_user_error else RuntimeError(f"rank 0 failed: {message}")
    return shared[0]


def holder_record():
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]),
        "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
    }


def read_holder(path):
    """The record of whoever holds (or last held) the lock of output `path`; None when there is none to read."""
    try:
        return json.loads(lock_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_holder(fd, wait_s=1.0):
    # The holder writes its record just after it takes the lock: give it a moment to be there.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            record = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _is_current(fd, file):
    """True when `fd` is the file now at `file` (not one deleted since it was opened)."""
    try:
        now = os.stat(file)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)
