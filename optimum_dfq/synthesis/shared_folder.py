"""Checking that every process of a multi-process synthesis sees the same cache folder, by a probe file.

Every process of a run writes its finished batches into the cache folder and the main process reads them back, so the
folder must be one folder for all of them: the same filesystem, whatever the machines. Host names and paths cannot
tell (machines may share an NFS home; containers on one host may each mount their own disk under the same path), so
[`processes_not_sharing`] asks the filesystem: the main process writes a uniquely named probe file into the folder,
every other process looks for it there (under its own view of the path) and writes one of its own beside it, and the
main process looks for those. Each process removes what it wrote before returning, however the check ends, and the
main process also removes the folders it made for its probe when the folder turns out not to be shared (they would
otherwise stay behind, empty, as the run keeps no cache there).

The probe files are named `.optimum_dfq-probe-<32 hexadecimal digits>[-<rank>]` ([`PROBE_NAME_RE`]);
[`~optimum_dfq.synthesis.cache_admin.list_cached_runs`] ignores them, so that `optimum-dfq cache list` never takes one
(left by a process killed during the check) for a run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

from .distributed import broadcast_from_main, gather_lists

PROBE_PREFIX = ".optimum_dfq-probe-"
#: The names of probe files: the main process's `<prefix><token>`, another process's `<prefix><token>-<rank>`.
PROBE_NAME_RE = re.compile(rf"^{re.escape(PROBE_PREFIX)}[0-9a-f]{{32}}(-\d+)?$")


def processes_not_sharing(state, folder: str | os.PathLike) -> dict[int, str]:
    """The processes that do not share `folder` with the main process, each with what failed.

    A process shares the folder when it sees, under its own `folder` (the path may differ between processes), the
    probe file the main process has just written there, and when the main process sees the probe file it writes
    there in turn. The main process creates `folder` (and its parents) if missing; the other processes create
    nothing outside a folder in which they saw the main process's probe. Every process takes part in the same
    collective calls and returns the same answer; each removes its own probe file before returning, and the main
    process removes the folders it made (if still empty) unless every process shares them. A single-process run is not
    probed (nothing is written).

    Args:
        state (`accelerate.PartialState`): the run's process state.
        folder (`str` or `os.PathLike`): the folder, as this process names it.

    Returns:
        `dict[int, str]`: rank → why that process does not share the folder (e.g. `"sees no probe file that the main
        process wrote there"`); empty when every process shares it. When the main process cannot write its probe,
        the answer is `{0: "cannot write there (...)"}`.

    Example:
        >>> from types import SimpleNamespace
        >>> processes_not_sharing(SimpleNamespace(num_processes=1), "/any/folder")  # one process: nothing to check
        {}
    """
    if state.num_processes == 1:
        return {}
    folder = Path(os.path.expanduser(os.fspath(folder)))
    written: list[Path] = []
    made: list[Path] = []  # the folders the main process made, outermost first
    shared = False
    try:
        main_answer = None
        if state.is_main_process:
            token = secrets.token_hex(16)
            made.extend(parent for parent in reversed([folder, *folder.parents]) if not parent.exists())
            main_answer = (token, _write_probe(folder / f"{PROBE_PREFIX}{token}", token, written, create_folder=True))
        token, main_failure = broadcast_from_main(state, main_answer)
        if main_failure is not None:
            return {0: main_failure}
        mine = None
        if not state.is_main_process:
            mine = _answer_probe(folder, token, state.process_index, written)
        failures = {rank: why for rank, why in enumerate(gather_lists(state, [mine])) if why is not None}
        if state.is_main_process:
            for rank in range(1, state.num_processes):
                if rank not in failures and not _sees_probe(folder / f"{PROBE_PREFIX}{token}-{rank}", token):
                    failures[rank] = "wrote a probe file there that the main process does not see"
        failures = broadcast_from_main(state, failures if state.is_main_process else None)
        shared = not failures
        return failures
    finally:  # after the last collective call: no process removes its probe before the main process looked for it
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        for path in [] if shared else reversed(made):
            with contextlib.suppress(OSError):  # not empty: something else now uses it
                path.rmdir()


def _answer_probe(folder: Path, token: str, rank: int, written: list[Path]) -> str | None:
    """Why this (non-main) process does not share `folder`, or `None`, once it has written its own probe there."""
    if not _sees_probe(folder / f"{PROBE_PREFIX}{token}", token):
        return "sees no probe file that the main process wrote there"
    return _write_probe(folder / f"{PROBE_PREFIX}{token}-{rank}", token, written, create_folder=False)


def _write_probe(path: Path, token: str, written: list[Path], *, create_folder: bool) -> str | None:
    """Writes `token` into the new file `path` (recorded in `written` once created); what failed, or `None`."""
    try:
        if create_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as file:  # exclusive: never takes over another run's probe
            written.append(path)
            file.write(token.encode())
    except OSError as err:
        return f"cannot write there ({type(err).__name__}: {err})"
    return None


def _sees_probe(path: Path, token: str) -> bool:
    try:
        return path.read_bytes() == token.encode()
    except OSError:
        return False
