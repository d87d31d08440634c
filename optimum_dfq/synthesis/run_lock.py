"""Marks a cached synthesis run as live while a synthesis uses it: an OS advisory lock on `<run folder>/run.lock`.

Every process of a synthesis that uses a run folder holds a shared lock on its `run.lock` ([`hold_run_lock`]) from
before it reads the run until it returns or fails (Ctrl-C and SIGTERM included); the OS drops the lock of a process
that dies, so a crashed run is never taken for live. [`run_is_live`] tries an exclusive lock without waiting and
releases it at once: it fails only while a synthesis holds the run. [`run_deletion_lock`] holds the exclusive lock
while a run is deleted, so that a synthesis starting meanwhile waits (no more than the deletion takes) and then starts
afresh instead of failing in a folder being removed.

The lock file is empty and stays when the run ends (removing it would race with a process about to lock it); no
lock file means no synthesis has held the run since this version, hence not live.

Where locks are unavailable no run is ever found live, and `optimum-dfq cache prune` falls back on its one-hour rule
alone: on Windows (no `fcntl`), and on a filesystem that refuses `flock` (some network filesystems; the synthesis then
logs a warning). On an NFS mount with `nolock` (or `local_lock=flock`) locks are seen only on the machine taking them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; liveness falls back on the last change (see the module docstring)
    fcntl = None

RUN_LOCK_NAME = "run.lock"
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})  # another process holds a conflicting lock
_LOCK_ATTEMPTS = 10  # each retry needs the run deleted meanwhile; a bound only guards against odd filesystems

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def hold_run_lock(directory: str | os.PathLike) -> Iterator[bool]:
    """Holds a shared lock on the run folder's `run.lock` (created with the folder if missing) while the block runs,
    so that `optimum-dfq cache` takes the run for live and neither deletes nor prunes it.

    Waits while a deletion holds the run (see [`run_deletion_lock`]); when that deletion removed the lock file, the
    folder and lock file are made again and locked. Where locking is not possible (no `fcntl`, a filesystem refusing
    `flock`, a folder that cannot be written) the block runs unlocked, with a log line saying why.

    Args:
        directory (`str` or `os.PathLike`): the run folder.

    Yields:
        `bool`: whether the lock is held.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root, hold_run_lock(Path(root) / "run") as held:
        ...     held == (fcntl is not None), run_is_live(Path(root) / "run") == held
        (True, True)
    """
    handle = _lock_shared(Path(directory))
    try:
        yield handle is not None
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock


def run_is_live(directory: str | os.PathLike) -> bool:
    """Whether a synthesis holds the run folder `directory` (see [`hold_run_lock`]).

    Tries an exclusive lock on its `run.lock` without waiting, and releases it at once (a synthesis starting meanwhile
    waits for that, it does not fail). Creates nothing.

    Args:
        directory (`str` or `os.PathLike`): the run folder.

    Returns:
        `bool`: `False` too when it cannot be told (no lock file, no `fcntl`, a filesystem refusing `flock`).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     run_is_live(root)
        False
    """
    handle = _open_lock_file(Path(directory) / RUN_LOCK_NAME, create=False)
    if handle is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in _BUSY_ERRNOS
    finally:
        os.close(handle)
    return False


@contextlib.contextmanager
def run_deletion_lock(directory: str | os.PathLike) -> Iterator[bool]:
    """Holds an exclusive lock on the run folder's `run.lock` (created if missing, as the folder is being deleted)
    while the block deletes the folder, unless a synthesis holds the run.

    Args:
        directory (`str` or `os.PathLike`): the run folder.

    Yields:
        `bool`: `False` when a synthesis holds the run (nothing is locked: leave it), else `True` (locked, or locking
        is not possible here: delete as before).

    Example:
        >>> import shutil, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     run = Path(root) / "run"
        ...     run.mkdir()
        ...     with run_deletion_lock(run) as free:
        ...         if free:  # no synthesis holds it
        ...             shutil.rmtree(run)
        ...     run.exists()
        False
    """
    handle = _open_lock_file(Path(directory) / RUN_LOCK_NAME, create=True)
    if handle is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(handle)
            handle = None
            if err.errno in _BUSY_ERRNOS:
                yield False
                return
    try:
        yield True
    finally:
        if handle is not None:
            os.close(handle)


def _lock_shared(directory: Path) -> int | None:
    """Opens and share-locks `directory/run.lock`; returns the descriptor, or `None` when locking is not possible."""
    if fcntl is None:
        return None
    path = directory / RUN_LOCK_NAME
    for _ in range(_LOCK_ATTEMPTS):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # the synthesis reports it where it writes the run
            logger.info("Cannot make the synthesis run folder %s (%s); the run is not locked.", directory, err)
            return None
        handle = _open_lock_file(path, create=True)
        if handle is None:
            logger.info("Cannot open %s; the run is not locked, so `optimum-dfq cache` cannot tell that it is going on "
                        "(`cache prune` keeps it while it changed in the last hour).", path)
            return None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in _BUSY_ERRNOS:
                    raise
                logger.info("Waiting for `optimum-dfq cache` to release %s (a deletion of the run, or a check)", path)
                fcntl.flock(handle, fcntl.LOCK_SH)
        except OSError as err:
            os.close(handle)
            logger.warning("Cannot lock %s (%s: %s): this filesystem refuses advisory locks, so `optimum-dfq cache "
                           "delete` would delete this run while it goes on, and `cache prune` keeps it only while it "
                           "changed in the last hour.", path, type(err).__name__, err)
            return None
        except BaseException:  # Ctrl-C while waiting
            os.close(handle)
            raise
        if _is_linked(handle, path):
            return handle
        os.close(handle)  # a deletion removed the run while this process waited: lock the folder made again
    logger.warning("Cannot lock %s: it is replaced each time it is locked; the run is not locked.", path)
    return None


def _open_lock_file(path: Path, create: bool) -> int | None:
    """A descriptor of `path`, read-write if possible (an exclusive lock emulated over NFS needs it), else read-only;
    `None` when `fcntl` is missing, or the file is missing (and not to be created) or cannot be opened."""
    if fcntl is None:
        return None
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    for mode in (flags, os.O_RDONLY):
        try:
            return os.open(path, mode, 0o666)
        except FileNotFoundError:
            if mode == os.O_RDONLY or not create:
                return None
        except OSError:  # e.g. a run folder of another user: try read-only
            continue
    return None


def _is_linked(handle: int, path: Path) -> bool:
    """Whether the locked file is still the one at `path` (a deletion may have removed it while this process waited)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)
