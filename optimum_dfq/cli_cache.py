"""The `optimum-dfq cache {list,delete,prune}` commands: see the synthesis cache's runs and reclaim their disk space.

Library side: [`~optimum_dfq.synthesis.cache_admin`]. Imports stay light at module level (only argparse), as in
[`optimum_dfq.cli`], which adds these commands with [`add_cache_command`].
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .synthesis.cache_admin import CachePruning

_IN_USE = "a synthesis is using it; wait for it to end, or stop it, to delete it"
CACHE_ROOT_HELP = ("synthesis cache folder (default: $OPTIMUM_DFQ_CACHE/synthesis, else "
                   "$HF_HOME/optimum_dfq/synthesis; looked at even when OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE is set, "
                   "which only stops writing to it)")


def add_cache_command(subparsers) -> None:
    """Adds `cache` with its `list`, `delete` and `prune` sub-commands to the `subparsers` of the command line."""
    parser = subparsers.add_parser(
        "cache",
        help="list the runs of the synthesis cache, and delete them to reclaim disk space",
        description="See what the synthesis cache holds (`cache list`) and reclaim its disk space (`cache delete`, "
        "`cache prune`). Only folders named by a run key are ever deleted.",
    )
    commands = parser.add_subparsers(title="cache commands", dest="cache_command", metavar="COMMAND")
    listing = commands.add_parser(
        "list",
        help="list the cached synthesis runs: status, images, model, size",
        description="List every run of the synthesis cache (complete, partial with its finished images and "
        "checkpointed batches, or empty; '(running)' while a synthesis uses it) and every entry that is not a run "
        "(unknown, with the reason), then the total.",
    )
    listing.add_argument("--cache-dir", default=None, help=CACHE_ROOT_HELP)
    listing.set_defaults(handler=run_cache_list)
    deleting = commands.add_parser(
        "delete",
        help="delete cached synthesis runs by key, or all of them",
        description="Delete the runs named by KEY (a run key or its first characters, at least 4, as `cache list` "
        "shows them), or every run with --all. Prints what was removed and the space freed. A run that a synthesis "
        "is using (running, in `cache list`) is never deleted: naming one deletes nothing, --all skips it.",
    )
    deleting.add_argument("keys", nargs="*", metavar="KEY", help="run key, or its first characters (at least 4)")
    deleting.add_argument("--all", dest="delete_all", action="store_true",
                          help="delete every run (asks for confirmation on a terminal unless --yes)")
    deleting.add_argument("-y", "--yes", action="store_true", help="confirm --all without asking")
    deleting.add_argument("--cache-dir", default=None, help=CACHE_ROOT_HELP)
    deleting.set_defaults(handler=run_cache_delete)
    pruning = commands.add_parser(
        "prune",
        help="delete the cached synthesis runs changed before an age, or beyond a total size",
        description="Delete the runs changed longer ago than --older-than, and/or the least recently changed runs "
        "until the runs take at most --max-size (last change as `cache list` shows it). A run that a synthesis is "
        "using is kept, and so is a run that is not complete and changed in the last hour: a synthesis may still be "
        "writing it where locks are unavailable (`cache delete KEY` deletes it). Prints each run deleted and the "
        "space freed.",
    )
    pruning.add_argument("--older-than", metavar="DURATION",
                         help="delete the runs last changed longer ago than this: a number and a unit, s, m, h, d or "
                         "w (e.g. 30d, 12h, 90m)")
    pruning.add_argument("--max-size", metavar="SIZE",
                         help="delete the least recently changed runs until the runs take at most this: a number and "
                         "a unit (e.g. 5GB, 500MB; GB is 10^9 bytes, as `cache list` counts, GiB 2^30)")
    pruning.add_argument("--dry-run", action="store_true", help="print what would be deleted and the space freed; "
                         "delete nothing")
    pruning.add_argument("-y", "--yes", action="store_true", help="delete without asking (needed off a terminal)")
    pruning.add_argument("--cache-dir", default=None, help=CACHE_ROOT_HELP)
    pruning.set_defaults(handler=run_cache_prune)
    parser.set_defaults(handler=functools.partial(_print_help, parser))


def run_cache_list(args: argparse.Namespace) -> int:
    from .synthesis.cache_admin import list_cached_runs

    root = _cache_root(args.cache_dir)
    runs = list_cached_runs(root)
    if not runs:
        why = "the folder is empty" if root.is_dir() else "the folder does not exist"
        print(f"No synthesis runs cached in {root} ({why}).")
        return 0
    print(_runs_table(runs))
    counts = ", ".join(f"{sum(run.status == status for run in runs)} {status}" for status in _statuses(runs))
    running = sum(run.live for run in runs)
    counts += f"; {running} running" if running else ""
    total = _megabytes(sum(run.size_bytes for run in runs))
    print(f"\n{_counted(len(runs), 'entry', 'entries')} ({counts}), {total} MB in {root}")
    return 0


def run_cache_delete(args: argparse.Namespace) -> int:
    from .synthesis.cache_admin import delete_cached_runs, list_cached_runs

    _check_cache_delete_flags(args)
    root = _cache_root(args.cache_dir)
    if args.delete_all:
        runs = [run for run in list_cached_runs(root) if run.is_run]
        idle = [run for run in runs if not run.live]
        if not idle:
            for run in runs:
                print(_skipped_line(run))
            print(f"No synthesis runs cached in {root}{' but those in use' if runs else ''}; nothing deleted.")
            return 0
        size = _megabytes(sum(run.size_bytes for run in idle))
        in_use = f" but the {_counted(len(runs) - len(idle), 'run', 'runs')} in use" if len(idle) < len(runs) else ""
        question = f"Delete every synthesis run in {root}{in_use}: {_counted(len(idle), 'run', 'runs')}, {size} MB?"
        if not args.yes and not _confirmed(question, f"--all deletes every synthesis run in {root}"):
            print("Cancelled; nothing deleted.")
            return 0
    deletion = delete_cached_runs(root, args.keys, delete_all=args.delete_all)
    print("\n".join(_removed_lines(deletion.removed, root)))
    for run in deletion.skipped:
        print(_skipped_line(run))
    if args.delete_all:
        _report_entries_left(root)
    return 0


def run_cache_prune(args: argparse.Namespace) -> int:
    from .cli import PROG
    from .synthesis.cache_admin import delete_cached_runs, parse_duration, parse_size, prune_cached_runs, short_key

    _check_cache_prune_flags(args)
    older_than = None if args.older_than is None else parse_duration(args.older_than, "--older-than")
    max_size = None if args.max_size is None else parse_size(args.max_size, "--max-size")
    root = _cache_root(args.cache_dir)
    plan = prune_cached_runs(root, older_than=older_than, max_size=max_size, dry_run=True)
    if not plan.removed:
        print(_nothing_to_prune(root, plan, args))
    elif args.dry_run:
        print("\n".join(_removed_lines(plan.removed, root, dry_run=True)))
    else:
        runs = _counted(len(plan.removed), "run", "runs")
        question = "\n".join([*_removed_lines(plan.removed, root, dry_run=True), f"Delete {runs}?"])
        if not args.yes and not _confirmed(question, f"cache prune deletes {runs} in {root}"):
            print("Cancelled; nothing deleted.")
            return 0
        # exactly the runs found (and shown), not those the rules would pick a moment later
        deletion = delete_cached_runs(root, [run.key for run in plan.removed], skip_live=True)
        print("\n".join(_removed_lines(deletion.removed, root)))
        plan = dataclasses.replace(plan, kept=(*plan.kept, *deletion.skipped), left=(*plan.left, *deletion.skipped))
    for run in plan.kept:
        if run.live:
            print(f"kept {_run_cell(run)}: {_IN_USE}")
        else:
            print(f"kept {_run_cell(run)}: not complete and changed in the last hour, so a synthesis may still be "
                  f"writing it (`{PROG} cache delete {short_key(run.key)}` deletes it)")
    print(f"{'would leave' if args.dry_run else 'left'} {_counted(len(plan.left), 'run', 'runs')}, "
          f"{_megabytes(plan.size_left)} MB")
    return 0


def _nothing_to_prune(root: Path, plan: CachePruning, args: argparse.Namespace) -> str:
    """Why `cache prune` deletes nothing: an empty cache, only runs it must keep, or no run beyond the rules."""
    if not plan.left:
        return f"No synthesis runs cached in {root}; nothing deleted."
    if plan.kept:
        return f"Nothing to prune in {root} but runs that must be kept (below); nothing deleted."
    reasons = []
    if args.older_than is not None:
        reasons.append(f"no run was last changed more than {args.older_than} ago")
    if args.max_size is not None:
        reasons.append(f"the runs take {_megabytes(plan.size_left)} MB, within --max-size {args.max_size}")
    return f"Nothing to prune in {root}: {' and '.join(reasons)}; nothing deleted."


def _cache_root(cache_dir: str | None) -> Path:
    """The folder the `cache` commands look at: `--cache-dir`, else the library default (whether or not
    `OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE` turns writing to it off)."""
    from .synthesis.cache import default_cache_dir, resolve_cache_dir

    return default_cache_dir() if cache_dir is None else resolve_cache_dir(cache_dir)


def _check_cache_delete_flags(args: argparse.Namespace) -> None:
    """Refuses `cache delete` with neither KEY nor --all, with both, or with --yes but no --all (which asks nothing)."""
    from .cli import PROG
    from .errors import DFQError

    if args.keys and args.delete_all:
        raise DFQError("give the KEYs of the runs to delete, or --all, not both.")
    if not args.keys and not args.delete_all:
        raise DFQError(f"name the runs to delete by KEY (their first characters, as `{PROG} cache list` shows them), "
                       "or pass --all to delete every run.")
    if args.yes and not args.delete_all:
        raise DFQError("--yes confirms --all; deleting runs named by KEY asks nothing, so drop --yes.")


def _check_cache_prune_flags(args: argparse.Namespace) -> None:
    """Refuses `cache prune` with no rule to prune by, or with both --dry-run and --yes (a dry run asks nothing)."""
    from .errors import DFQError

    if args.older_than is None and args.max_size is None:
        raise DFQError("give --older-than DURATION (e.g. 30d) to delete the runs changed before that, and/or "
                       "--max-size SIZE (e.g. 5GB) to delete the least recently changed runs beyond that size.")
    if args.dry_run and args.yes:
        raise DFQError("--yes confirms deleting; --dry-run deletes nothing and asks nothing, so drop one of them.")


def _confirmed(question: str, action: str) -> bool:
    """Asks `question` on the terminal; off a terminal, refuses to do `action` (a deletion) unconfirmed."""
    from .errors import DFQError

    if not sys.stdin.isatty():
        raise DFQError(f"{action}, and there is no terminal to ask for confirmation: add --yes to confirm. Nothing "
                       "was deleted.")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _removed_lines(runs, root: Path, dry_run: bool = False) -> list[str]:
    """One line per run deleted (or to delete, for a dry run), then the space freed."""
    freed = _megabytes(sum(run.size_bytes for run in runs))
    return [*(f"{'would delete' if dry_run else 'deleted'} {_run_cell(run)}" for run in runs),
            f"{'would free' if dry_run else 'freed'} {freed} MB in {root}"]


def _skipped_line(run) -> str:
    return f"skipped {_run_cell(run)}: {_IN_USE}"


def _run_cell(run) -> str:
    from .synthesis.cache_admin import short_key

    return (f"{short_key(run.key)} ({run.status}, {run.synthesizer or 'unknown synthesizer'}, "
            f"{_megabytes(run.size_bytes)} MB)")


def _report_entries_left(root: Path) -> None:
    from .synthesis.cache_admin import list_cached_runs

    left = [run.key for run in list_cached_runs(root) if not run.is_run]
    if left:
        shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
        print(f"left {_counted(len(left), 'entry', 'entries')} that {'is' if len(left) == 1 else 'are'} no synthesis "
              f"run: {shown}")


def _statuses(runs) -> list[str]:
    from .synthesis.cache_admin import STATUSES

    return [status for status in STATUSES if any(run.status == status for run in runs)]


def _runs_table(runs) -> str:
    """The table of `cache list`: one line per entry, columns aligned, the size right-aligned."""
    from .synthesis.cache_admin import short_key

    header = ["KEY", "STATUS", "SYNTHESIZER", "IMAGES", "MODEL", "SIZE (MB)", "MODIFIED", "NOTE"]
    rows = [[short_key(run.key), f"{run.status} (running)" if run.live else run.status, run.synthesizer or "-",
             _images_cell(run), _shorten(run.model or "-"), _megabytes(run.size_bytes), _modified_cell(run.modified),
             _note_cell(run)] for run in runs]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    size_column = header.index("SIZE (MB)")
    lines = ["  ".join(cell.rjust(width) if column == size_column else cell.ljust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _images_cell(run) -> str:
    total = "?" if run.num_images is None else str(run.num_images)
    if run.status == "complete":
        return total
    return "-" if run.status == "unknown" else f"{run.images_done}/{total}"


def _note_cell(run) -> str:
    if run.status == "unknown":
        return run.reason or ""
    batches = "; ".join(f"images {batch.start}-{batch.stop - 1} at step {batch.step}" for batch in run.checkpoints)
    return f"checkpointed: {batches}" if batches else ""


def _modified_cell(timestamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "-"


def _shorten(text: str, width: int = 40) -> str:
    """`text`, or its end after `...` when longer than `width` (a model's local path ends with its name)."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _counted(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f}"


def _print_help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help()
    return 2
