"""The lock that marks a cached synthesis run as live: taken by each process of a synthesis, probed by `cache`."""

from __future__ import annotations

import errno
import fcntl
import logging
import shutil
import threading
import types

import pytest
from synth_helpers import FAST, NORM, one_thread, tiny_vit  # noqa: F401

from optimum_dfq.synthesis import get_synthesizer, run_lock
from optimum_dfq.synthesis.cache_admin import list_cached_runs
from optimum_dfq.synthesis.run_lock import RUN_LOCK_NAME, hold_run_lock, run_deletion_lock, run_is_live

pytestmark = pytest.mark.usefixtures("one_thread")


def _hold_in_a_thread(folder):
    """Starts a thread that holds `folder` as a synthesis does; returns it, an event set once it holds the lock, and
    one to set to release it."""
    held, release, found = threading.Event(), threading.Event(), []

    def hold():
        with hold_run_lock(folder) as locked:
            found.append(locked)
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread, held, release, found


def test_a_held_run_is_live_and_the_probe_leaves_it_held(tmp_path):
    folder = tmp_path / "run"
    assert not run_is_live(folder) and not folder.exists()  # the probe makes nothing
    with hold_run_lock(folder) as held:
        assert held and (folder / RUN_LOCK_NAME).is_file()
        assert run_is_live(folder) and run_is_live(folder)  # probing twice: the first probe released at once
    assert not run_is_live(folder) and (folder / RUN_LOCK_NAME).is_file()  # released; the file stays


@pytest.mark.parametrize("deleted", [False, True])
def test_a_synthesis_starting_while_a_run_is_deleted_waits_then_holds_it(deleted, tmp_path):
    folder = tmp_path / "run"
    (folder / "shards").mkdir(parents=True)
    with run_deletion_lock(folder) as free:
        assert free
        thread, held, release, found = _hold_in_a_thread(folder)
        assert not held.wait(0.5)  # waits for the deletion instead of failing
        if deleted:
            shutil.rmtree(folder)
    assert held.wait(30) and found == [True]
    assert run_is_live(folder)  # the lock it holds is the one in the folder, made again if it was deleted
    assert sorted(path.name for path in folder.iterdir()) == ([RUN_LOCK_NAME] if deleted else [RUN_LOCK_NAME, "shards"])
    release.set()
    thread.join(30)
    assert not run_is_live(folder)


def test_a_live_run_is_not_locked_for_deletion(tmp_path):
    folder = tmp_path / "run"
    with hold_run_lock(folder), run_deletion_lock(folder) as free:
        assert not free
    with run_deletion_lock(folder) as free:
        assert free


def test_without_fcntl_nothing_is_locked_and_no_run_is_live(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)  # Windows
    folder = tmp_path / "run"
    with hold_run_lock(folder) as held:
        assert not held and not run_is_live(folder)
        with run_deletion_lock(folder) as free:
            assert free
    assert not folder.exists()


def _refusing_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")


def test_a_filesystem_refusing_locks_lets_the_synthesis_run_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    no_locks = types.SimpleNamespace(LOCK_SH=fcntl.LOCK_SH, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB,
                                     flock=_refusing_flock)
    monkeypatch.setattr(run_lock, "fcntl", no_locks)
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        calibration = get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2, seed=0, cache_dir=tmp_path, **NORM)
    assert len(calibration) == 2
    (run,) = list_cached_runs(tmp_path)
    assert (run.status, run.live) == ("complete", False)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith(f"Cannot lock {run.path / RUN_LOCK_NAME} (OSError: [Errno {errno.ENOLCK}] No locks ")
    assert "`cache prune` keeps it only while it changed in the last hour" in warning
