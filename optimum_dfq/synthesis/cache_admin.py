"""Seeing and reclaiming the disk space of the synthesis cache: what `optimum-dfq cache list`, `cache delete` and
`cache prune` run.

[`list_cached_runs`] describes every entry of a cache root (see [`~optimum_dfq.synthesis.cache`] for the layout of a
run), [`delete_cached_runs`] removes runs named by their key or a unique prefix of it, [`prune_cached_runs`] those
changed before an age or, least recently changed first, those beyond a total size. Only folders named by a run key
(64 hexadecimal digits) that hold nothing but what a synthesis run writes are ever deleted: anything else in the root
(including a folder named by a SHA-256 that holds other files, as other tools' caches have) is listed as `"unknown"`
and left alone, so that a cache folder given by mistake (a home folder, say) loses nothing. The probe files with which a
multi-process synthesis checks that every process sees the root ([`~optimum_dfq.synthesis.shared_folder`]) are
neither listed nor deleted.

A run that a synthesis is using is live (`CachedRun.live`): each process of the synthesis holds a shared lock on the
run's `run.lock` (see [`~optimum_dfq.synthesis.run_lock`]), which the OS drops when the process ends or dies. Live runs
are never deleted: [`delete_cached_runs`] refuses to delete one named by its key and skips them when deleting all,
[`prune_cached_runs`] keeps them; the check is made again under an exclusive lock just before a run is deleted, and a
synthesis starting meanwhile waits for the deletion to end. Pruning also never deletes an unfinished run changed in
the last hour (`UNFINISHED_RUN_GRACE_S`; a synthesis going on writes its run at every checkpoint, every 100 steps by
default, and at every finished batch): the only protection where locks are unavailable (Windows, filesystems that
refuse `flock`, such as some network filesystems; an NFS mount with `nolock` sees only its own machine's locks), and
for a synthesis by a version of this library that took no lock. There, deleting the run of a synthesis going on makes
that synthesis fail; run it again to start over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import DFQError
from .cache import TEMPORARY_NAME_RE, SynthesisCache
from .run_lock import RUN_LOCK_NAME, run_deletion_lock, run_is_live
from .shared_folder import PROBE_NAME_RE

RUN_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_RUN_ENTRY_RE = re.compile(r"^(run\.(json|lock)|shards|partial|calibration_set(\.damaged\d*)?)$")  # what a run writes
MIN_PREFIX_LENGTH = 4
RunStatus = Literal["complete", "partial", "empty", "unknown"]
STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
UNFINISHED_RUN_GRACE_S = 3600.0  # prune leaves a run that is not complete and changed more recently than this
_DURATION_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_FORMS = "a number and a unit, s, m, h, d or w (e.g. 30d, 12h, 90m)"
_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, **{f"{prefix}b": 1000 ** power for power, prefix in enumerate("kmgt", 1)},
               **{f"{prefix}ib": 1024 ** power for power, prefix in enumerate("kmgt", 1)}}
SIZE_FORMS = ("a number and a unit, B, KB, MB, GB, TB (powers of 1000, as `cache list` counts) or KiB, MiB, GiB, TiB "
              "(powers of 1024), e.g. 5GB, 500MB")


class CacheKeyError(DFQError):
    """A run key or key prefix given to delete cached runs matches no run, or several."""


class CacheRunLiveError(DFQError):
    """A run named to be deleted is in use by a synthesis going on."""


class CachePruneError(DFQError):
    """The rules to prune a synthesis cache by are missing, or an age or size is ill-formed."""


@dataclass(frozen=True)
class BatchProgress:
    """A batch of a run checkpointed part-way: images `start..stop-1`, optimised for `step` steps."""

    start: int
    stop: int
    step: int


@dataclass(frozen=True)
class CachedRun:
    """One entry of a synthesis cache root, as [`list_cached_runs`] finds it.

    Args:
        key (`str`): the folder's name: the run key (64 hexadecimal digits), or whatever an unknown entry is called.
        path (`Path`): the folder (or file, for an unknown entry).
        status (`str`): `"complete"` (the finished set is saved), `"partial"` (some batches finished or
            checkpointed), `"empty"` (described by `run.json`, nothing synthesized yet) or `"unknown"` (not a run, or
            one whose `run.json` is missing or unreadable; see `reason`).
        synthesizer (`str`, *optional*): the synthesizer's name, from `run.json`.
        model (`str`, *optional*): the model's `name_or_path`, from `run.json` (`None` if it was built in memory).
        num_images (`int`, *optional*): images the run synthesizes.
        seed (`int`, *optional*): the run's seed.
        images_done (`int`): images finished: all of them for a complete run, those of its cached batches otherwise.
        checkpoints (`tuple[BatchProgress, ...]`): the batches checkpointed part-way, with the step they reached.
        size_bytes (`int`): total size of its files in bytes (apparent sizes; symbolic links are not followed).
        modified (`float`): the latest modification time of anything in it (seconds since the epoch).
        reason (`str`, *optional*): why an `"unknown"` entry is not taken for a run.
        is_run (`bool`): whether the entry is a folder named by a run key holding nothing but what a run writes,
            hence may be deleted (even when its `run.json` is unreadable).
        live (`bool`): whether a synthesis is using the run now (it holds the run's lock), so that it is not deleted;
            always `False` where locks are unavailable (see the module docstring).
    """

    key: str
    path: Path
    status: RunStatus
    synthesizer: str | None = None
    model: str | None = None
    num_images: int | None = None
    seed: int | None = None
    images_done: int = 0
    checkpoints: tuple[BatchProgress, ...] = ()
    size_bytes: int = 0
    modified: float = 0.0
    reason: str | None = None
    is_run: bool = True
    live: bool = False


@dataclass(frozen=True)
class CacheDeletion:
    """What [`delete_cached_runs`] removed.

    Args:
        removed (`tuple[CachedRun, ...]`): the runs deleted, as they were just before.
        freed_bytes (`int`): the total size of their files.
        skipped (`tuple[CachedRun, ...]`, *optional*): the runs to delete that were left because a synthesis is
            using them (`live`).
    """

    removed: tuple[CachedRun, ...]
    freed_bytes: int
    skipped: tuple[CachedRun, ...] = ()


@dataclass(frozen=True)
class CachePruning(CacheDeletion):
    """What [`prune_cached_runs`] removed, or would remove when it is a dry run.

    Args:
        removed (`tuple[CachedRun, ...]`): the runs deleted (to delete, for a dry run), least recently changed first.
        freed_bytes (`int`): the total size of their files.
        skipped (`tuple[CachedRun, ...]`): those of `kept` that a synthesis is using (`live`).
        kept (`tuple[CachedRun, ...]`): the runs that a rule would delete but that are left because a synthesis is
            using them (`live`), or because they are not complete and changed in the last hour
            (`UNFINISHED_RUN_GRACE_S`): a synthesis may still be writing them.
        left (`tuple[CachedRun, ...]`): the runs left (would be left, for a dry run), `kept` among them; their total
            size is `size_left`.
        dry_run (`bool`): whether nothing was deleted.
    """

    kept: tuple[CachedRun, ...] = ()
    left: tuple[CachedRun, ...] = ()
    dry_run: bool = False

    @property
    def size_left(self) -> int:
        """The total size in bytes of the runs left."""
        return sum(run.size_bytes for run in self.left)


def list_cached_runs(cache_dir: str | os.PathLike) -> list[CachedRun]:
    """Describes every entry of a synthesis cache root, runs first by most recent change, then unknown entries.

    Reading never fails on a damaged or foreign entry: it is listed with status `"unknown"` and the reason. Files that
    vanish while the root is scanned (a synthesis going on) are skipped, as are the probe files of a multi-process
    synthesis checking that the folder is shared ([`~optimum_dfq.synthesis.shared_folder.PROBE_NAME_RE`]).

    Args:
        cache_dir (`str` or `os.PathLike`): the cache root (e.g. [`~optimum_dfq.synthesis.cache.default_cache_dir`]).

    Returns:
        `list[CachedRun]`: empty when the folder does not exist or holds nothing.

    Raises:
        `NotADirectoryError`: `cache_dir` is a file.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     list_cached_runs(root)
        []
    """
    root = Path(os.path.expanduser(os.fspath(cache_dir)))
    if not root.exists():
        return []
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a synthesis cache folder.")
    # a probe file is not listed: it lives for the instant a multi-process synthesis checks the folder is shared
    entries = [_describe_entry(entry) for entry in root.iterdir() if not PROBE_NAME_RE.match(entry.name)]
    return sorted(entries, key=lambda run: (run.status == "unknown", -run.modified, run.key))


def delete_cached_runs(cache_dir: str | os.PathLike, keys: list[str] | None = None, *,
                       delete_all: bool = False, skip_live: bool = False) -> CacheDeletion:
    """Deletes runs of a synthesis cache, named by their key or a unique prefix of it, or all of them, except the
    runs a synthesis is using (`live`).

    Every key is matched, and every run named checked not to be live, before anything is deleted, so a bad key or a
    live run deletes nothing. Only entries named by a run key are deleted (see the module docstring); `delete_all`
    leaves the other entries of the root in place. A run found live just before its deletion (a synthesis started
    meanwhile) is left and returned in `skipped`.

    Args:
        cache_dir (`str` or `os.PathLike`): the cache root.
        keys (`list[str]`, *optional*): run keys, or prefixes of at least `MIN_PREFIX_LENGTH` (4) characters that
            match one run each.
        delete_all (`bool`, *optional*, defaults to `False`): delete every run instead of those of `keys`; live
            runs are skipped.
        skip_live (`bool`, *optional*, defaults to `False`): skip the live runs of `keys` instead of refusing them.

    Returns:
        `CacheDeletion`: the runs removed, the bytes freed and the live runs skipped.

    Raises:
        `CacheKeyError`: a prefix shorter than 4 characters, or one that matches no run or several; neither or both
            of `keys` and `delete_all` given.
        `CacheRunLiveError`: a run of `keys` is live (unless `skip_live`); the message names it and says to wait for
            its synthesis to end, or stop it.
        `OSError`: a run could not be removed (e.g. no permission); the message names the runs already removed.

    Example:
        >>> delete_cached_runs("~/.cache/huggingface/optimum_dfq/synthesis", ["3f2a"])  # doctest: +SKIP
        CacheDeletion(removed=(CachedRun(key='3f2a9c...', ...),), freed_bytes=38012345)
    """
    if bool(keys) == delete_all:
        raise CacheKeyError("Name the runs to delete by key (or key prefix), or delete them all (not both).")
    entries = list_cached_runs(cache_dir)
    runs = [run for run in entries if run.is_run]
    root = Path(os.path.expanduser(os.fspath(cache_dir)))
    chosen = runs if delete_all else _match_keys(entries, keys or [], root)
    live = [run for run in chosen if run.live]
    if live and not (delete_all or skip_live):
        raise CacheRunLiveError(_live_refusal(live, root))
    removed, skipped = _remove_runs([run for run in chosen if not run.live])
    return CacheDeletion(removed, sum(run.size_bytes for run in removed), skipped=(*live, *skipped))


def prune_cached_runs(cache_dir: str | os.PathLike, *, older_than: str | float | None = None,
                      max_size: str | int | None = None, dry_run: bool = False) -> CachePruning:
    """Deletes the runs of a synthesis cache changed before an age, and/or the least recently changed runs until the
    runs take at most a size.

    A run's last change is the latest modification time of anything in it, as [`list_cached_runs`] reports it. Runs
    of any status are pruned (complete, partial, empty, or named by a run key with an unreadable `run.json`), except
    that a run a synthesis is using (`live`, however long ago it changed), and a run that is not complete and changed
    less than an hour ago (`UNFINISHED_RUN_GRACE_S`: a synthesis going on writes its run at every checkpoint and
    finished batch, and where locks are unavailable no run is found live), are always left, and returned in `kept` if
    a rule reached them (delete a recent run that is not live by its key with [`delete_cached_runs`]). Entries that
    are no run are neither deleted nor counted in the total size.

    Args:
        cache_dir (`str` or `os.PathLike`): the cache root.
        older_than (`str` or `float`, *optional*): delete the runs whose last change is older than this: an age such
            as `"30d"`, `"12h"`, `"90m"` (see [`parse_duration`]), or seconds.
        max_size (`str` or `int`, *optional*): then delete the least recently changed runs until the runs left take
            at most this: a size such as `"5GB"`, `"500MB"`, `"2GiB"` (see [`parse_size`]), or bytes.
        dry_run (`bool`, *optional*, defaults to `False`): delete nothing; return what would be deleted.

    Returns:
        `CachePruning`: the runs removed (or to remove), the bytes freed, the live and recent unfinished runs kept
        and the runs left.

    Raises:
        `CachePruneError`: neither `older_than` nor `max_size` given, or one of them ill-formed.
        `OSError`: a run could not be removed (e.g. no permission); the message names the runs already removed.

    Example:
        >>> prune_cached_runs("~/.cache/huggingface/optimum_dfq/synthesis", older_than="30d", max_size="5GB",
        ...                   dry_run=True)  # doctest: +SKIP
        CachePruning(removed=(CachedRun(key='3f2a9c...', ...),), freed_bytes=38012345, kept=(), left=(...), ...)
    """
    if older_than is None and max_size is None:
        raise CachePruneError("Give older_than (an age, e.g. '30d') and/or max_size (a size, e.g. '5GB') to prune a "
                              "synthesis cache by; nothing was deleted.")
    age_limit = None if older_than is None else parse_duration(older_than)
    size_limit = None if max_size is None else parse_size(max_size)
    runs = sorted((run for run in list_cached_runs(cache_dir) if run.is_run), key=lambda run: (run.modified, run.key))
    now, size_left = time.time(), sum(run.size_bytes for run in runs)  # runs only: nothing else is deleted
    chosen: list[CachedRun] = []
    kept: list[CachedRun] = []
    for run in runs:  # least recently changed first, so every run past the age comes before the others
        past_age = age_limit is not None and now - run.modified > age_limit
        over_size = size_limit is not None and size_left > size_limit
        if not (past_age or over_size):
            continue
        if run.live or (run.status != "complete" and now - run.modified < UNFINISHED_RUN_GRACE_S):
            kept.append(run)
            continue
        chosen.append(run)
        size_left -= run.size_bytes
    removed, skipped = (tuple(chosen), ()) if dry_run else _remove_runs(chosen)
    kept += skipped  # found live just before their deletion: a synthesis started meanwhile
    gone = {run.key for run in removed}
    left = tuple(run for run in runs if run.key not in gone)
    return CachePruning(removed, sum(run.size_bytes for run in removed), kept=tuple(kept), left=left, dry_run=dry_run,
                        skipped=tuple(run for run in kept if run.live))


def parse_duration(value: str | float, name: str = "older_than") -> float:
    """The seconds of an age such as `"30d"`: a number and a unit, `s`, `m` (minutes), `h`, `d` or `w` (weeks).

    Args:
        value (`str` or `float`): the age; a number is taken as seconds.
        name (`str`, *optional*, defaults to `"older_than"`): what the value is given as, for the error message
            (e.g. `"--older-than"`).

    Returns:
        `float`: seconds, at least 0.

    Raises:
        `CachePruneError`: anything else (e.g. `"30"`, `"30 days"`, `"1M"`, a negative number), naming the accepted
            forms.

    Example:
        >>> parse_duration("30d"), parse_duration("12h"), parse_duration("1.5m"), parse_duration(45)
        (2592000.0, 43200.0, 90.0, 45.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= 0:
            return float(value)
        raise CachePruneError(f"{name} must be an age of at least 0 seconds; got {value}.")
    found = _DURATION_RE.match(value.strip()) if isinstance(value, str) else None
    if found is None:
        raise CachePruneError(f"{name} {value!r} is not an age: give {DURATION_FORMS}.")
    return float(found.group(1)) * _DURATION_UNITS[found.group(2)]


def parse_size(value: str | int, name: str = "max_size") -> int:
    """The bytes of a size such as `"5GB"`: a number and a unit, `B`, `KB`, `MB`, `GB`, `TB` (powers of 1000, as
    `optimum-dfq cache list` counts megabytes) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), in any case.

    Args:
        value (`str` or `int`): the size; an integer is taken as bytes.
        name (`str`, *optional*, defaults to `"max_size"`): what the value is given as, for the error message
            (e.g. `"--max-size"`).

    Returns:
        `int`: bytes (rounded down), at least 0.

    Raises:
        `CachePruneError`: anything else (e.g. `"5"`, `"5G"`, a negative number), naming the accepted forms.

    Example:
        >>> parse_size("5GB"), parse_size("500mb"), parse_size("1.5KiB"), parse_size(100)
        (5000000000, 500000000, 1536, 100)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
        raise CachePruneError(f"{name} must be a size of at least 0 bytes; got {value}.")
    found = _SIZE_RE.match(value.strip()) if isinstance(value, str) else None
    if found is None:
        raise CachePruneError(f"{name} {value!r} is not a size: give {SIZE_FORMS}.")
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2).lower()])


def short_key(key: str, length: int = 12) -> str:
    """The first `length` characters of a run key, as `optimum-dfq cache list` shows it.

    Example:
        >>> short_key("3f2a9c1b7d4e" + "0" * 52)
        '3f2a9c1b7d4e'
    """
    return key[:length]


def _remove_runs(runs: list[CachedRun]) -> tuple[tuple[CachedRun, ...], tuple[CachedRun, ...]]:
    """Deletes the folders of `runs`, in order, each under an exclusive lock (see the module docstring); returns the
    runs deleted and those left because a synthesis started using them since they were listed (returned live). A run
    already gone counts as deleted."""
    removed: list[CachedRun] = []
    skipped: list[CachedRun] = []
    for run in runs:
        try:
            with run_deletion_lock(run.path) as free:
                if not free:
                    skipped.append(dataclasses.replace(run, live=True))
                    continue
                _remove_run_folder(run.path)
        except FileNotFoundError:  # deleted meanwhile by another process: it is gone all the same
            pass
        except OSError as err:
            done = ", ".join(short_key(gone.key) for gone in removed) or "none"
            raise OSError(f"Could not delete the cached run {run.path} ({err}); runs already deleted: {done}.") from err
        removed.append(run)
    return tuple(removed), tuple(skipped)


def _remove_run_folder(folder: Path) -> None:
    """Deletes a run folder, its lock file last, so that a synthesis starting meanwhile waits on the lock held for
    the deletion, then finds the lock file gone and locks the folder it makes again, rather than a folder being
    deleted."""
    for entry in folder.iterdir():
        if entry.name == RUN_LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    (folder / RUN_LOCK_NAME).unlink(missing_ok=True)
    folder.rmdir()


def _live_refusal(live: list[CachedRun], root: Path) -> str:
    names = ", ".join(short_key(run.key) for run in live)
    runs, are = ("run", "is") if len(live) == 1 else ("runs", "are")
    return (f"The synthesis {runs} {names} in {root} {are} in use by a synthesis going on, so not deleted: wait for "
            "it to end, or stop it, then delete again. Nothing was deleted.")


def _match_keys(entries: list[CachedRun], keys: list[str], root: Path) -> list[CachedRun]:
    chosen: dict[str, CachedRun] = {}
    for key in keys:
        run = _match_key(entries, key, root)
        chosen[run.key] = run
    return list(chosen.values())


def _match_key(entries: list[CachedRun], key: str, root: Path) -> CachedRun:
    runs = [entry for entry in entries if entry.is_run]
    prefix = key.strip().lower()
    if len(prefix) < MIN_PREFIX_LENGTH:
        raise CacheKeyError(f"The key prefix {key!r} is too short: give at least {MIN_PREFIX_LENGTH} characters of a "
                            "run key, as `optimum-dfq cache list` shows them. Nothing was deleted.")
    matches = [run for run in runs if run.key.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(short_key(run.key) for run in matches)
        raise CacheKeyError(f"The key prefix {key!r} matches {len(matches)} runs in {root} ({names}): give more "
                            "characters of the key. Nothing was deleted.")
    if Path(key).name == key and (root / key).exists():
        other = next((entry for entry in entries if entry.key == key and entry.reason), None)
        why = "its name is no run key" if RUN_KEY_RE.match(key) is None or other is None else (
            other.reason.removeprefix("not a synthesis run: "))
        raise CacheKeyError(f"{root / key} is not a synthesis run ({why}), so it is not deleted; remove it by hand "
                            "if it is yours. Nothing was deleted.")
    raise CacheKeyError(f"No synthesis run in {root} has a key starting with {key!r}; `optimum-dfq cache list` shows "
                        "the keys. Nothing was deleted.")


def _describe_entry(entry: Path) -> CachedRun:
    size_bytes, modified = _disk_usage(entry)
    found = {"key": entry.name, "path": entry, "size_bytes": size_bytes, "modified": modified}
    if not _is_run_folder(entry):
        return CachedRun(status="unknown", reason=_not_a_run_reason(entry), is_run=False, **found)
    foreign = _foreign_entries(entry)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return CachedRun(status="unknown", reason=f"not a synthesis run: it holds {shown}, which no synthesis run "
                         "writes", is_run=False, **found)
    found["live"] = run_is_live(entry)
    try:
        info = _read_run_info(entry / "run.json")
    except FileNotFoundError:
        return CachedRun(status="unknown", reason="no run.json describes this run (it was stopped before it began, or "
                         "written by another tool)", **found)
    except (OSError, ValueError) as err:
        return CachedRun(status="unknown", reason=f"unreadable run.json ({type(err).__name__}: {err})", **found)
    try:
        return _describe_run(entry, info, found)
    except OSError as err:
        return CachedRun(status="unknown", reason=f"unreadable folder ({type(err).__name__}: {err})", **found)


def _is_run_folder(entry: Path) -> bool:
    return RUN_KEY_RE.match(entry.name) is not None and entry.is_dir() and not entry.is_symlink()


def _foreign_entries(folder: Path) -> list[str]:
    """The names in `folder` that a synthesis run does not write (none when it cannot be read: it is then listed as
    an unreadable run)."""
    try:
        names = sorted(entry.name for entry in folder.iterdir())
    except OSError:
        return []
    return [name for name in names if not _RUN_ENTRY_RE.match(name) and not TEMPORARY_NAME_RE.match(name)]


def _not_a_run_reason(entry: Path) -> str:
    if not entry.is_dir() or entry.is_symlink():
        return "not a folder, so not a synthesis run"
    return "not a synthesis run: its name is no run key (64 hexadecimal digits)"


def _read_run_info(path: Path) -> dict[str, Any]:
    info = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or "synthesizer" not in info:
        raise ValueError("it does not describe a synthesis run (no 'synthesizer' field)")
    return info


def _describe_run(folder: Path, info: dict[str, Any], found: dict[str, Any]) -> CachedRun:
    cache = SynthesisCache(folder.parent, folder.name)
    num_images = _whole_number(info.get("num_images"))
    checkpoints = tuple(BatchProgress(*progress) for progress in cache.partial_progress())
    if cache.is_complete():
        status, images_done = "complete", num_images or 0
    else:
        images_done = _covered_images(cache.shard_ranges(), num_images)
        status = "partial" if images_done or checkpoints else "empty"
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    name_or_path = model.get("name_or_path")
    return CachedRun(status=status, synthesizer=str(info["synthesizer"]),
                     model=str(name_or_path) if name_or_path else None, num_images=num_images,
                     seed=_whole_number(info.get("seed")), images_done=images_done, checkpoints=checkpoints, **found)


def _covered_images(ranges: list[tuple[int, int]], num_images: int | None) -> int:
    """How many distinct images the batches `ranges` hold (batches of two grids may overlap)."""
    limit = num_images if num_images is not None else max((stop for _, stop in ranges), default=0)
    covered, reached = 0, 0
    for start, stop in sorted(ranges):
        start, stop = max(start, reached), min(stop, limit)
        if stop > start:
            covered += stop - start
            reached = stop
    return covered


def _whole_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _disk_usage(entry: Path) -> tuple[int, float]:
    """Total apparent size in bytes of the regular files under `entry` (or of `entry` itself), and the latest
    modification time of anything in it; what vanishes or cannot be read meanwhile is skipped."""
    found = [_lstat(entry)]
    if entry.is_dir() and not entry.is_symlink():
        for folder, subfolders, files in os.walk(entry):
            found += [_lstat(Path(folder, name)) for name in subfolders + files]
    found = [entry_stat for entry_stat in found if entry_stat is not None]
    size = sum(entry_stat.st_size for entry_stat in found if stat.S_ISREG(entry_stat.st_mode))
    return size, max((entry_stat.st_mtime for entry_stat in found), default=0.0)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None
