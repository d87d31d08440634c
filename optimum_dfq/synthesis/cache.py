"""On-disk cache of synthesis runs: per-batch shards while a run goes on, the finished set when it is done.

A run lives in `<cache_dir>/<run key>/`. Each finished batch is written atomically (temporary file + rename) as
`shards/<start>-<stop>.safetensors`, so an interrupted run resumes with the batches it has not finished. A batch
being optimised is checkpointed as `partial/<start>-<stop>.safetensors` (every `checkpoint_every` steps and on
Ctrl-C; see [`BatchCheckpoint`]), so that it resumes from the step it had reached; the file goes once its shard is
written (and any left by another batch grid once the finished set is saved). The
finished set is saved with [`save_calibration_set`] into `calibration_set/` (also via a rename), whose presence
marks the run complete. The directory must be visible to every process of a multi-process run (the synthesis
checks it with a probe file: [`~optimum_dfq.synthesis.shared_folder`]).

Shards are only reused by a run whose batch grid they lie on (see [`SynthesisCache.finished_chunks`]): a shard left by
a run with another `batch_size` is ignored, never mixed in. A run that names no `batch_size` takes the grid of the
batches it finds ([`SynthesisCache.cached_batch_size`]), as its default depends on its number of processes. Two runs
with the same key may share the directory; the first to finish saves the set, and the other returns that saved set
instead of its own (which may differ slightly if its `batch_size` differed), so that every user of the key calibrates
on the same images.

Damaged files (a shard or a finished set that cannot be read back, as a machine crash can leave them) are moved aside
with a `.damaged` suffix, never deleted, and a warning names them; the run then synthesizes those images again (a
damaged finished set is rebuilt from the shards, which are kept).

Temporary files are named after their writer (`.<name>.tmp-<host>-<pid>-<random>`). One whose writer was killed
mid-write (SIGKILL, a crash; Ctrl-C and SIGTERM clean up after themselves) is removed when a run of the same key
starts on the same host, once that process is gone and the file is 10 minutes old; temporaries of live processes,
of other hosts sharing the folder, and recent ones are left alone.

Where the cache lives: [`resolve_cache_dir`]. By default every synthesis that optimises images is cached (so that an
interrupted run resumes) under `$OPTIMUM_DFQ_CACHE/synthesis`, `$OPTIMUM_DFQ_CACHE` defaulting to
`$HF_HOME/optimum_dfq` (`~/.cache/huggingface/optimum_dfq`); `cache_dir=False` (`--no-cache`) or
`OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE=1` turns that default off.

While a synthesis uses a run, each of its processes holds a shared lock on the run's `run.lock`
([`SynthesisCache.running`], see [`~optimum_dfq.synthesis.run_lock`]): `optimum-dfq cache` then takes the run for live
and neither deletes nor prunes it.

To see the runs of a cache and reclaim their space: [`~optimum_dfq.synthesis.cache_admin`] (`optimum-dfq cache list`,
`optimum-dfq cache delete`, `optimum-dfq cache prune`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..calibration.data import CalibrationSet
from ..errors import ConfigError
from .context import BatchRecord
from .dataset import load_calibration_set, save_calibration_set, to_jsonable
from .engine import EngineState
from .run_lock import hold_run_lock

_SHARD_RE = re.compile(r"^(\d+)-(\d+)\.safetensors$")
_EXTRA_PREFIX = "extra."
_CHECKPOINT_FORMAT = "optimum_dfq.batch_checkpoint/1"
TEMPORARY_NAME_RE = re.compile(r"^\..+\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]+$")
CACHE_ENV = "OPTIMUM_DFQ_CACHE"
DISABLE_CACHE_ENV = "OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE"
_TRUE_VALUES, _FALSE_VALUES = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
ABANDONED_TEMPORARY_AGE_S = 600.0  # a live writer's file changes within seconds; 10 minutes allows for slow disks

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The synthesis cache used when `cache_dir` is not given: `$OPTIMUM_DFQ_CACHE/synthesis`, where
    `OPTIMUM_DFQ_CACHE` defaults to `$HF_HOME/optimum_dfq` (`~/.cache/huggingface/optimum_dfq`).

    Returns:
        `Path`

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/huggingface/optimum_dfq/synthesis')
    """
    from huggingface_hub import constants

    root = os.environ.get(CACHE_ENV) or os.path.join(constants.HF_HOME, "optimum_dfq")
    return Path(os.path.expanduser(root)) / "synthesis"


def default_cache_disabled() -> bool:
    """Whether `OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE` turns the default synthesis cache off.

    Raises:
        `ConfigError`: for a value that is neither true (`1`, `true`, `yes`, `on`) nor false (`0`, `false`, `no`,
            `off`, empty), rather than guessing.
    """
    value = os.environ.get(DISABLE_CACHE_ENV, "").strip().lower()
    if value not in _TRUE_VALUES + _FALSE_VALUES:
        raise ConfigError(f"{DISABLE_CACHE_ENV}={os.environ[DISABLE_CACHE_ENV]!r} is not a yes/no value; set it to "
                          "1 to turn the default synthesis cache off, or unset it.")
    return value in _TRUE_VALUES


def resolve_cache_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """The synthesis cache folder that `cache_dir=` stands for, or `None` for no cache.

    Args:
        cache_dir (`str`, `os.PathLike`, `bool` or `None`): a folder; `None` or `True` for the default one
            ([`default_cache_dir`], unless `OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE` is set); `False` for no cache.

    Returns:
        `Path` or `None`

    Raises:
        `ConfigError`: for anything else (e.g. a number), or a bad `OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE` value.

    Example:
        >>> resolve_cache_dir(False) is None, resolve_cache_dir("/tmp/dfq-cache")
        (True, PosixPath('/tmp/dfq-cache'))
    """
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return None if default_cache_disabled() else default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir):
        raise ConfigError(f"cache_dir must be a folder, None/True for the default synthesis cache, or False for none; "
                          f"got {cache_dir!r}.")
    return Path(os.path.expanduser(os.fspath(cache_dir)))


class SynthesisCache:
    """The cache directory of one synthesis run.

    Args:
        root (`str` or `PathLike`): the cache root (`cache_dir=` of `synthesize`).
        key (`str`): the run's fingerprint (hash of synthesizer, hyper-parameters, model, seed, image count).

    Example:
        >>> cache = SynthesisCache("~/.cache/optimum_dfq/synthesis", key)  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, key: str) -> None:
        self.directory = Path(os.path.expanduser(os.fspath(root))) / key
        self.shards = self.directory / "shards"
        self.complete_path = self.directory / "calibration_set"
        self.partial = self.directory / "partial"
        self._read_back: dict[tuple[int, int], BatchRecord] = {}  # shards read by finished_chunks, until taken

    def running(self) -> contextlib.AbstractContextManager[bool]:
        """Marks the run as live while the block runs: holds a shared lock on its `run.lock` (made with the run
        folder if missing), released when the block ends, however it ends (see [`~optimum_dfq.synthesis.run_lock`]).

        Returns:
            `contextlib.AbstractContextManager[bool]`: yields whether the lock is held (not where locks are
            unavailable).

        Example:
            >>> with SynthesisCache(root, key).running():  # doctest: +SKIP
            ...     ...  # synthesize into the run folder
        """
        return hold_run_lock(self.directory)

    def is_complete(self) -> bool:
        """Whether the finished set of this run is saved."""
        return self.complete_path.is_dir()

    def load_complete(self) -> CalibrationSet:
        """The finished set of this run (see [`SynthesisCache.is_complete`])."""
        return load_calibration_set(self.complete_path)

    def load_complete_if_readable(self) -> CalibrationSet | None:
        """The finished set, or `None` when there is none or it cannot be read back.

        An unreadable set is moved aside (see the module docstring) so that the run rebuilds it from its shards.
        """
        if not self.is_complete():
            return None
        identity = _folder_identity(self.complete_path)
        try:
            return self.load_complete()
        except Exception as err:  # filtered by _is_damage: what remains means the set is damaged
            if not _is_damage(err):
                raise
            if _folder_identity(self.complete_path) != identity:  # another run replaced it meanwhile: read that one
                return self.load_complete_if_readable()
            self._move_aside(self.complete_path, err)
            return None

    def save_complete(self, calibration_set: CalibrationSet) -> bool:
        """Saves the finished set (staged in a temporary folder, then renamed into place).

        If the set is already saved (a concurrent run with the same key finished first), that set is kept and the
        staged copy is dropped: both runs have the same key, hence the same images.

        Args:
            calibration_set (`CalibrationSet`): the complete set of the run.

        Returns:
            `bool`: whether this call saved the set (`False` when an existing one was kept).
        """
        if self.is_complete():
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix("calibration_set"), dir=self.directory))
        try:
            save_calibration_set(calibration_set, staging / "set")
            for file in (staging / "set").rglob("*"):
                if file.is_file():
                    _flush_to_disk(file)
            try:
                os.replace(staging / "set", self.complete_path)
            except OSError as err:  # renaming onto a non-empty folder: another run saved the set meanwhile
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.is_complete():
                    raise
                return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def remove_abandoned_temporaries(self) -> list[Path]:
        """Removes the temporary files and folders that writers killed mid-write left in this run's folders.

        Only those written on this host by a process that no longer exists, and last modified over
        `ABANDONED_TEMPORARY_AGE_S` ago (another run sharing the folder from a container with its own process
        numbering could be writing one), are removed; nothing is removed on systems without POSIX processes. One that
        cannot be removed (no permission) is left, with a warning.

        Returns:
            `list[Path]`: what was removed.
        """
        if os.name != "posix":
            return []
        removed, host = [], _host_tag()
        for folder in (self.directory, self.shards, self.partial):
            entries = list(folder.iterdir()) if folder.is_dir() else []
            for entry in entries:
                match = TEMPORARY_NAME_RE.match(entry.name)
                if (match is None or match["host"] != host or _process_exists(int(match["pid"]))
                        or not _older_than(entry, ABANDONED_TEMPORARY_AGE_S)):
                    continue
                try:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        os.remove(entry)
                    removed.append(entry)
                except FileNotFoundError:
                    pass
                except OSError as err:  # best effort: e.g. another user's folder in a cache shared by a group
                    logger.warning("Could not remove %s, left by a killed synthesis run (%s); delete it by hand.",
                                   entry, err)
        if removed:
            logger.info("Removed %d temporary file(s) left by killed synthesis runs in %s", len(removed),
                        self.directory)
        return removed

    def write_run_info(self, material: dict[str, Any]) -> None:
        """Writes `run.json`, the description of the run (what its key hashes, plus provenance such as the model's
        `name_or_path`), for people inspecting the cache."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.directory / "run.json", json.dumps(to_jsonable(material), indent=2, sort_keys=True))

    def shard_ranges(self) -> list[tuple[int, int]]:
        """`(start, stop)` of every finished batch, sorted."""
        return [(start, stop) for start, stop, _ in _batch_files(self.shards)]

    def cached_batch_size(self, num_images: int) -> int | None:
        """The batch size of the grid that every cached batch of this run (finished or checkpointed) lies on.

        Lets a run that did not choose its `batch_size` resume on the grid of the run it continues, whose default
        batch size depended on its number of processes.

        Args:
            num_images (`int`): images of the run.

        Returns:
            `int` or `None`: `None` when nothing is cached, the batches lie on several grids, or only a last batch
            `(start, num_images)` with `start > 0` is cached (its grid's batch size cannot be told).
        """
        ranges = set(self.shard_ranges()) | {(start, stop) for start, stop, _ in _batch_files(self.partial)}
        inner = [stop - start for start, stop in ranges if stop < num_images]
        if inner:
            size = max(inner)
        elif ranges == {(0, num_images)}:
            size = num_images
        else:
            return None
        on_grid = all(start % size == 0 and stop == min(start + size, num_images) for start, stop in ranges)
        return size if on_grid else None

    def finished_chunks(self, grid: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The chunks of `grid` whose shard is cached and readable, in grid order.

        Call it on one process only (the main one in a multi-process run): it reads every shard, moves damaged
        ones aside and removes the checkpoints of finished batches. Shards that are not chunks of `grid` (left by a
        run of the same key with another `batch_size`) are ignored: mixing them in would overlap or leave gaps, and
        their images belong to another batch grid.

        Args:
            grid (`list[tuple[int, int]]`): the run's `(start, stop)` chunks.

        Returns:
            `list[tuple[int, int]]`
        """
        cached = set(self.shard_ranges())
        chunks = {tuple(chunk) for chunk in grid}
        if cached - chunks:
            logger.info("%d cached batch(es) in %s lie on another batch grid (another batch_size or process count) "
                        "and are not reused", len(cached - chunks), self.shards)
        finished = [chunk for chunk in grid if tuple(chunk) in cached and self._shard_is_readable(*chunk)]
        for start, stop in finished:  # a crash between writing a shard and removing its checkpoint leaves both
            self.batch_checkpoint(start, stop, None).discard()
        return finished

    def batch_checkpoint(self, start: int, stop: int, every: int | None) -> BatchCheckpoint:
        """The checkpoint file of the batch of images `start..stop-1` (see [`BatchCheckpoint`]).

        Args:
            start (`int`), stop (`int`): the batch's images.
            every (`int`, *optional*): steps between two checkpoints (`None` or 0: only on Ctrl-C).

        Returns:
            `BatchCheckpoint`
        """
        return BatchCheckpoint(self.partial / f"{start:08d}-{stop:08d}.safetensors", every)

    def discard_checkpoints(self) -> None:
        """Removes every batch checkpoint (those left by a run with another batch grid): once the finished set is
        saved, nothing resumes from them. Damaged ones, moved aside, stay."""
        for _, _, path in _batch_files(self.partial):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def partial_progress(self) -> list[tuple[int, int, int]]:
        """`(start, stop, step)` of every batch checkpointed part-way, sorted (read from the files' headers only)."""
        progress = []
        for start, stop, path in _batch_files(self.partial):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    progress.append((start, stop, int((handle.metadata() or {})["step"])))
            except (OSError, KeyError, ValueError, SafetensorError) as err:  # reported when a run resumes from it
                logger.debug("Unreadable batch checkpoint %s: %s", path, err)
        return progress

    def _shard_path(self, start: int, stop: int) -> Path:
        return self.shards / f"{start:08d}-{stop:08d}.safetensors"

    def _shard_is_readable(self, start: int, stop: int) -> bool:
        path = self._shard_path(start, stop)
        try:
            record = self._read_back[(start, stop)] = self.read_shard(start, stop)
            if (record.start, record.stop) != (start, stop) or record.pixel_values.shape[0] != stop - start:
                raise ValueError(f"it holds images {record.start}-{record.stop} "
                                 f"({record.pixel_values.shape[0]} images), not {start}-{stop}")
        except Exception as err:  # filtered by _is_damage: what remains means the shard is damaged
            if not _is_damage(err):
                raise
            self._read_back.pop((start, stop), None)
            self._move_aside(path, err)
            return False
        return True

    def take_shard(self, start: int, stop: int) -> BatchRecord:
        """The cached batch `start..stop-1`: as [`SynthesisCache.finished_chunks`] read it back on this process (not
        read again), else read now."""
        record = self._read_back.pop((start, stop), None)
        return record if record is not None else self.read_shard(start, stop)

    @staticmethod
    def _move_aside(path: Path, err: Exception) -> None:
        target = _move_aside(path)
        if target is not None:
            logger.warning("Cached synthesis output %s cannot be read back (%s: %s); moved to %s, and its images are "
                           "synthesized again.", path, type(err).__name__, err, target)

    def write_shard(self, record: BatchRecord) -> None:
        self.shards.mkdir(parents=True, exist_ok=True)
        tensors = {"pixel_values": record.pixel_values.contiguous()}
        if record.labels is not None:
            tensors["labels"] = record.labels.detach().cpu().contiguous()
        if record.soft_labels is not None:
            tensors["soft_labels"] = record.soft_labels.detach().cpu().contiguous()
        for name, value in record.extras.items():
            tensors[_EXTRA_PREFIX + name] = value.detach().cpu().contiguous()
        metadata = {"start": str(record.start), "stop": str(record.stop), "history": json.dumps(record.history)}
        _atomic_save_file(tensors, metadata, self._shard_path(record.start, record.stop))

    def read_shard(self, start: int, stop: int) -> BatchRecord:
        path = self._shard_path(start, stop)
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        extras = {k[len(_EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)}
        return BatchRecord(int(metadata.get("start", start)), int(metadata.get("stop", stop)), tensors["pixel_values"],
                           tensors.get("labels"), tensors.get("soft_labels"), extras,
                           json.loads(metadata.get("history", "{}")))


class BatchCheckpoint:
    """The checkpoint file of one batch being optimised: where [`optimize_batch`] saves and finds its state.

    Written atomically (temporary file, fsync, rename), so an interrupted save leaves the previous checkpoint. A file
    that cannot be read back, or whose state does not fit the batch, is moved aside with a `.damaged` suffix (named in
    a warning) and the batch starts again.

    Args:
        path (`Path`): the file.
        every (`int`, *optional*): steps between two checkpoints (`None` or 0: only on Ctrl-C).
    """

    def __init__(self, path: Path, every: int | None) -> None:
        self.path = path
        self.every = every

    def load(self) -> EngineState | None:
        """The saved state, or `None` when there is none (or it was unreadable and moved aside)."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:  # one open: another run sharing the cache
                metadata = handle.metadata() or {}  # may rename a newer save into place meanwhile
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
            if metadata.get("format") != _CHECKPOINT_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, not {_CHECKPOINT_FORMAT!r}")
            terms: dict[str, dict[str, Any]] = {}
            for term, key, tensor_key in json.loads(metadata["terms"]):
                terms.setdefault(term, {})[key] = tensors[tensor_key]
            optimizer = {key[len("optimizer."):]: value for key, value in tensors.items()
                         if key.startswith("optimizer.")}
            state = EngineState(int(metadata["step"]), tensors["images"], optimizer, tensors["augment"],
                                json.loads(metadata["history"]), terms)
        except FileNotFoundError:  # removed since the check by another run sharing the cache: it finished the batch
            return None
        except Exception as err:  # filtered by _is_damage: what remains means the file is damaged
            if not _is_damage(err):
                raise
            self.reject(f"{type(err).__name__}: {err}")
            return None
        return state

    def save(self, state: EngineState) -> None:
        """Replaces the saved state with `state`."""
        tensors = {"images": state.images.contiguous(), "augment": state.augment.contiguous()}
        tensors.update({f"optimizer.{key}": value.contiguous() for key, value in state.optimizer.items()})
        entries = []
        for position, (term, term_state) in enumerate(sorted(state.terms.items())):
            for key, value in term_state.items():
                tensor_key = f"term.{position}.{key}"
                tensors[tensor_key] = value.detach().cpu().contiguous()
                entries.append([term, key, tensor_key])
        metadata = {"format": _CHECKPOINT_FORMAT, "step": str(state.step), "history": json.dumps(state.history),
                    "terms": json.dumps(entries)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_file(tensors, metadata, self.path)

    def reject(self, reason: str) -> None:
        """Moves the file aside (`.damaged`), with a warning naming it and `reason`; the batch starts again."""
        target = _move_aside(self.path)
        if target is not None:
            logger.warning("The checkpoint %s of a batch being synthesized cannot resume it (%s); moved to %s, and the "
                           "batch starts again from step 0.", self.path, reason, target)

    def discard(self) -> None:
        """Removes the file (its batch is finished and cached as a shard)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _move_aside(path: Path) -> Path | None:
    """Renames `path` to `<name>.damaged` (or `.damaged2`, ...); returns the new path, `None` if it was gone."""
    target = path.with_name(path.name + ".damaged")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.name}.damaged{suffix}")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another run sharing the cache moved it first
        return None
    return target


def _batch_files(folder: Path) -> list[tuple[int, int, Path]]:
    """`(start, stop, path)` of every `<start>-<stop>.safetensors` file in `folder`, sorted (none if it is missing)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _SHARD_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), entry))
    return sorted(found)


def _atomic_save_file(tensors: dict[str, Any], metadata: dict[str, str], path: Path) -> None:
    """Writes a safetensors file under `path` all at once: to a temporary file in the same folder, flushed to disk,
    then renamed (so a crash leaves the previous file or none, never a partial one under the final name)."""
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path.stem), dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        _as_if_created(temporary)
        _flush_to_disk(temporary)  # else a crash after the rename can leave an empty file under the final name
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _temporary_prefix(name: str) -> str:
    """`.<name>.tmp-<host>-<pid>-`: names the writer, so that [`SynthesisCache.remove_abandoned_temporaries`] can
    tell a temporary a killed process left from one a live process is writing."""
    return f".{name}.tmp-{_host_tag()}-{os.getpid()}-"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks (POSIX; callers skip other systems, where it would terminate)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False


def _flush_to_disk(path: str | os.PathLike) -> None:
    with open(path, "r+b") as file:  # writable: fsync on a read-only descriptor fails on Windows
        os.fsync(file.fileno())


def _folder_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _is_damage(err: Exception) -> bool:
    """Whether a failure to read a cached file means the file is damaged, not that reading it failed for another
    reason (memory, permissions, a file moved meanwhile by another run), which must surface instead."""
    return not isinstance(err, (MemoryError, PermissionError, FileNotFoundError))


def _as_if_created(path: str | os.PathLike) -> None:
    """Gives a `mkstemp` file (owner-only, 0600) the permissions of a file created normally (0666 less the umask),
    so that a cache folder shared with other users stays readable to them, as its folders and finished set are."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path.stem), dir=path.parent)
    _as_if_created(temporary)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)
