"""Writers that never leave a half-written file: write beside the target, then rename over it."""

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path` (same suffix, so writers that infer a format from it still work); when
    the block succeeds the temporary file replaces `path`, when it fails the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)  # on disk before it takes the name: a crash leaves the old file or the whole new one
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_bytes(path, data):
    """Add `data` to the end of `path` with one write, on disk before returning. A reader sees whole appends, or after
    a crash mid-write a torn last one (the appenders' readers cut or skip it)."""
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a new empty folder beside `path`; when the block succeeds it takes the place of `path`, when it fails it
    is removed. `path` always holds the old folder or the whole new one: the two are swapped in one step where the
    kernel can (Linux renameat2 RENAME_EXCHANGE); elsewhere the old folder is renamed aside, the new one renamed in,
    and the old one put back if that fails. Only after the swap is the old folder deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if not path.exists():
            os.replace(tmp, path)
            return
        if not _exchange(tmp, path):
            _swap_by_renames(tmp, path)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the old folder now; a crash here leaves it beside `path`, hidden


def _swap_by_renames(new, path):
    """The old folder aside, the new one in, then the old one deleted; when the second rename fails the old folder is
    renamed back. A kill between the two renames leaves both folders intact beside `path` (`.NAME.old-*/NAME`)."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.replace(path, old / path.name)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old / path.name, path)
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            old.rmdir()  # only when empty: never the old folder, should even putting it back have failed
        raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a, b):
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel, C library or file system
    cannot, so that the caller falls back to two renames."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
