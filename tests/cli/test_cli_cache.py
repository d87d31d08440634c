"""`optimum-dfq cache list` / `cache delete` on real synthesis caches made by tiny runs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from ..conftest import tiny_vit
from .test_cli import run_cli

CACHE_MODEL = "tiny/vit-for-cache-tests"
HOUR, DAY = 3600, 86400


def _synthesize_into(cache_dir: Path | None, num_images: int, seed: int, monkeypatch=None,
                     ctrl_c_after_steps: int | None = None) -> Path:
    """Runs a tiny psaq synthesis (batches of 2 images, 4 steps each) into `cache_dir` (`None`: the default cache),
    stopped by Ctrl-C after `ctrl_c_after_steps` steps in all if given; returns its run folder."""
    from optimum_dfq.synthesis import get_synthesizer, pixel_synthesizer

    from ..conftest import CIFAR_MEAN, CIFAR_STD

    model = tiny_vit()
    model.config._name_or_path = CACHE_MODEL  # provenance only: recorded in run.json, not hashed
    synthesizer = get_synthesizer("psaq", iterations=(2, 2), warmup=1, jitter=(2, 4))
    arguments = {"seed": seed, "batch_size": 2, "cache_dir": cache_dir, "image_mean": CIFAR_MEAN,
                 "image_std": CIFAR_STD}
    if ctrl_c_after_steps is None:
        synthesizer.synthesize(model, num_images, **arguments)
        return _run_folder(cache_dir, seed)
    real, done = pixel_synthesizer.optimize_batch, [0]

    class CtrlC:
        def update(self, count):
            done[0] += count
            if done[0] == ctrl_c_after_steps:
                raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(pixel_synthesizer, "optimize_batch",
                      lambda *args, progress=None, **kwargs: real(*args, progress=CtrlC(), **kwargs))
        synthesizer.synthesize(model, num_images, **arguments)
    return _run_folder(cache_dir, seed)


def _run_folder(cache_dir: Path | None, seed: int) -> Path:
    from optimum_dfq.synthesis.cache import default_cache_dir

    root = cache_dir if cache_dir is not None else default_cache_dir()
    (found,) = [path.parent for path in root.glob("*/run.json") if json.loads(path.read_text())["seed"] == seed]
    return found


def _bytes_on_disk(*folders: Path) -> int:
    """The apparent sizes of the files under `folders` (as `du --apparent-size --bytes` adds them up)."""
    return sum(file.stat().st_size for folder in folders for file in folder.rglob("*") if file.is_file())


def _megabytes_on_disk(*folders: Path) -> str:
    """The size `cache list` shows."""
    return f"{_bytes_on_disk(*folders) / 1e6:.1f}"


@pytest.fixture
def synthesis_cache(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """A cache folder with a complete run (4 images), a run stopped by Ctrl-C at step 2 of its second batch (6 images:
    2 finished, 2 checkpointed) and a folder that is not a run; returns the cache folder and the two runs."""
    root = tmp_path / "synthesis-cache"
    complete = _synthesize_into(root, 4, seed=0)
    interrupted = _synthesize_into(root, 6, seed=1, monkeypatch=monkeypatch, ctrl_c_after_steps=4 + 2)
    (root / "my-notes").mkdir()
    (root / "my-notes" / "todo.txt").write_text("not a run")
    return root, complete, interrupted


def test_cache_list_shows_every_run_then_the_total(synthesis_cache):
    root, complete, interrupted = synthesis_cache
    result = run_cli("cache", "list", "--cache-dir", str(root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KEY", "STATUS", "SYNTHESIZER", "IMAGES", "MODEL", "SIZE", "(MB)", "MODIFIED", "NOTE"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == {complete.name[:12], interrupted.name[:12], "my-notes"}
    assert rows[complete.name[:12]].split()[:6] == [complete.name[:12], "complete", "psaq", "4", CACHE_MODEL,
                                                     _megabytes_on_disk(complete)]
    assert rows[interrupted.name[:12]].split()[:6] == [interrupted.name[:12], "partial", "psaq", "2/6", CACHE_MODEL,
                                                        _megabytes_on_disk(interrupted)]
    assert rows[interrupted.name[:12]].endswith("checkpointed: images 2-3 at step 2")
    assert rows["my-notes"].split()[1:4] == ["unknown", "-", "-"]
    assert rows["my-notes"].endswith("not a synthesis run: its name is no run key (64 hexadecimal digits)")
    total = _megabytes_on_disk(complete, interrupted, root / "my-notes")
    assert lines[4:] == ["", f"3 entries (1 complete, 1 partial, 1 unknown), {total} MB in {root}"]


def test_cache_list_of_a_missing_or_empty_cache_says_where_it_looked(tmp_path, capsys):
    from optimum_dfq.cli import main

    missing = tmp_path / "missing"
    assert main(["cache", "list", "--cache-dir", str(missing)]) == 0
    assert capsys.readouterr().out == f"No synthesis runs cached in {missing} (the folder does not exist).\n"
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"No synthesis runs cached in {tmp_path} (the folder is empty).\n"


def test_cache_delete_by_prefix_removes_that_run_and_prints_the_space_freed(synthesis_cache):
    root, complete, interrupted = synthesis_cache
    size = _megabytes_on_disk(interrupted)
    result = run_cli("cache", "delete", interrupted.name[:6], "--cache-dir", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"deleted {interrupted.name[:12]} (partial, psaq, {size} MB)",
                                          f"freed {size} MB in {root}"]
    assert sorted(path.name for path in root.iterdir()) == sorted([complete.name, "my-notes"])


@pytest.mark.parametrize("case, reason", [
    ("ambiguous", "matches 2 runs in {root} ("),
    ("unmatched", "No synthesis run in {root} has a key starting with '{unmatched}'; `optimum-dfq cache list` shows"),
    ("too short", "The key prefix 'abc' is too short: give at least 4 characters"),
    ("not a run", "{root}/my-notes is not a synthesis run (its name is no run key), so it is not deleted"),
    ("no key", "name the runs to delete by KEY (their first characters, as `optimum-dfq cache list` shows them)"),
    ("key and --all", "give the KEYs of the runs to delete, or --all, not both."),
    ("--yes without --all", "--yes confirms --all; deleting runs named by KEY asks nothing, so drop --yes."),
])
def test_cache_delete_refuses_what_does_not_name_runs_in_one_line_and_deletes_nothing(case, reason, synthesis_cache,
                                                                                      capsys):
    from optimum_dfq.cli import main

    root, complete, interrupted = synthesis_cache
    twin = root / (complete.name[:5] + ("0" if complete.name[5] != "0" else "1") * 59)  # shares a 5-character prefix
    shutil.copytree(complete, twin)
    entries = sorted(path.name for path in root.iterdir())
    unmatched = next(prefix for prefix in ("ffff", "eeee", "dddd") if not any(e.startswith(prefix) for e in entries))
    given = {"ambiguous": [complete.name[:5]], "unmatched": [unmatched], "too short": ["abc"],
             "not a run": ["my-notes"], "no key": [], "key and --all": ["--all"], "--yes without --all": ["--yes"]}
    keys = [] if case == "no key" else [interrupted.name]  # a key that alone would be deleted
    assert main(["cache", "delete", *keys, *given[case], "--cache-dir", str(root)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("optimum-dfq: error: "), error
    assert reason.format(root=root, unmatched=unmatched) in error[0], error
    if case == "ambiguous":
        assert set(error[0].split(" (")[1].split(")")[0].split(", ")) == {complete.name[:12], twin.name[:12]}
    assert sorted(path.name for path in root.iterdir()) == entries


def test_cache_delete_all_off_a_terminal_needs_yes_and_leaves_what_is_not_a_run(synthesis_cache):
    root, complete, interrupted = synthesis_cache
    refused = run_cli("cache", "delete", "--all", "--cache-dir", str(root))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (f"optimum-dfq: error: --all deletes every synthesis run in {root}, and there is "
                                      "no terminal to ask for confirmation: add --yes to confirm. Nothing was deleted.")
    assert len(list(root.iterdir())) == 3
    size = _megabytes_on_disk(complete, interrupted)
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    result = run_cli("cache", "delete", "--all", "--yes", "--cache-dir", str(root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    deleted = [f"deleted {complete.name[:12]} (complete, psaq, {sizes[complete]} MB)",
               f"deleted {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB)"]
    assert sorted(lines[:2]) == sorted(deleted)
    assert lines[2:] == [f"freed {size} MB in {root}", "left 1 entry that is no synthesis run: my-notes"]
    assert [path.name for path in root.iterdir()] == ["my-notes"]


@pytest.mark.parametrize("answer", ["n", "", "y"])
def test_cache_delete_all_on_a_terminal_asks_first(answer, synthesis_cache, monkeypatch, capsys):
    from optimum_dfq.cli import main

    root, complete, interrupted = synthesis_cache
    questions = []
    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr("builtins.input", lambda question: questions.append(question) or answer)
    size = _megabytes_on_disk(complete, interrupted)
    assert main(["cache", "delete", "--all", "--cache-dir", str(root)]) == 0
    assert questions == [f"Delete every synthesis run in {root}: 2 runs, {size} MB? [y/N] "]
    output = capsys.readouterr().out
    if answer == "y":
        assert f"freed {size} MB in {root}" in output and [path.name for path in root.iterdir()] == ["my-notes"]
    else:
        assert output == "Cancelled; nothing deleted.\n" and len(list(root.iterdir())) == 3


def test_cache_commands_look_at_the_default_cache_even_where_writing_to_it_is_off(default_synthesis_cache, monkeypatch,
                                                                                   capsys):
    from optimum_dfq.cli import main

    run = _synthesize_into(None, 2, seed=0)
    assert run.parent == default_synthesis_cache
    monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", "1")  # stops writing there, not looking
    listed = run_cli("cache", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:4] == [run.name[:12], "complete", "psaq", "2"]
    assert listed.stdout.splitlines()[-1].endswith(f"MB in {default_synthesis_cache}")
    assert main(["cache", "delete", run.name[:8]]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"MB in {default_synthesis_cache}")
    assert list(default_synthesis_cache.iterdir()) == []
    assert main(["cache", "list"]) == 0
    assert capsys.readouterr().out == f"No synthesis runs cached in {default_synthesis_cache} (the folder is empty).\n"


def test_cache_without_a_command_shows_its_commands(capsys):
    from optimum_dfq.cli import main

    assert main(["cache"]) == 2
    help_text = capsys.readouterr().out
    assert "optimum-dfq cache" in help_text and "list" in help_text and "delete" in help_text and "prune" in help_text


def test_optimum_cli_dfq_has_the_cache_commands(synthesis_cache, capsys):
    """`optimum-cli dfq` builds its parser with the register module's `parse_args` and runs `dispatch`."""
    import argparse

    from optimum.commands.register.dfq import DFQCommand
    from optimum_dfq.cli import dispatch

    root, complete, interrupted = synthesis_cache
    parser = argparse.ArgumentParser(prog="optimum-cli dfq")
    DFQCommand.parse_args(parser)
    assert dispatch(parser.parse_args(["cache", "delete", complete.name[:8], "--cache-dir", str(root)]), parser) == 0
    assert capsys.readouterr().out.startswith(f"deleted {complete.name[:12]} (complete, psaq,")
    assert dispatch(parser.parse_args(["cache", "list", "--cache-dir", str(root)]), parser) == 0
    assert "2 entries (1 partial, 1 unknown)" in capsys.readouterr().out
    assert dispatch(parser.parse_args(["cache", "prune", "--max-size", "0B", "--dry-run", "--cache-dir", str(root)]),
                    parser) == 0
    pruned = capsys.readouterr().out.splitlines()
    assert pruned[0] == f"Nothing to prune in {root} but runs that must be kept (below); nothing deleted."
    assert pruned[1].startswith(f"kept {interrupted.name[:12]} (partial, psaq,")


def test_cache_prune_older_than_deletes_the_old_runs_and_prints_each_and_the_space_freed(synthesis_cache,
                                                                                        set_last_change):
    root, complete, interrupted = synthesis_cache
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    nothing = run_cli("cache", "prune", "--older-than", "30d", "--cache-dir", str(root))  # just made: none is old
    assert nothing.returncode == 0, nothing.stderr
    total = _megabytes_on_disk(complete, interrupted)
    assert nothing.stdout.splitlines() == [
        f"Nothing to prune in {root}: no run was last changed more than 30d ago; nothing deleted.",
        f"left 2 runs, {total} MB"]  # it said "No synthesis run in ... to prune", as if the cache were empty
    nothing = run_cli("cache", "prune", "--older-than", "30d", "--max-size", "5GB", "--cache-dir", str(root))
    assert nothing.stdout.splitlines()[0] == (f"Nothing to prune in {root}: no run was last changed more than 30d ago "
                                              f"and the runs take {total} MB, within --max-size 5GB; nothing deleted.")
    empty = run_cli("cache", "prune", "--max-size", "5GB", "--cache-dir", str(root / "empty"))
    assert empty.stdout.splitlines()[0] == f"No synthesis runs cached in {root / 'empty'}; nothing deleted."
    set_last_change(complete, 40 * DAY)
    set_last_change(interrupted, 2 * DAY)
    set_last_change(root / "my-notes", 100 * DAY)
    result = run_cli("cache", "prune", "--older-than", "30d", "--yes", "--cache-dir", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"deleted {complete.name[:12]} (complete, psaq, {sizes[complete]} MB)",
                                          f"freed {sizes[complete]} MB in {root}",
                                          f"left 1 run, {sizes[interrupted]} MB"]
    assert sorted(path.name for path in root.iterdir()) == sorted([interrupted.name, "my-notes"])


def test_cache_prune_max_size_dry_run_shows_the_least_recently_changed_runs_that_would_go(synthesis_cache,
                                                                                         set_last_change):
    root, complete, interrupted = synthesis_cache
    set_last_change(interrupted, 3 * HOUR)
    set_last_change(complete, 2 * HOUR)
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    limit = f"{_bytes_on_disk(complete)}B"  # room for one run: the least recently changed one goes
    dry = run_cli("cache", "prune", "--max-size", limit, "--dry-run", "--cache-dir", str(root))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"would delete {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB)",
                                       f"would free {sizes[interrupted]} MB in {root}",
                                       f"would leave 1 run, {sizes[complete]} MB"]
    assert len(list(root.iterdir())) == 3
    result = run_cli("cache", "prune", "--max-size", limit, "--yes", "--cache-dir", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"deleted {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB)"
    assert sorted(path.name for path in root.iterdir()) == sorted([complete.name, "my-notes"])


def test_cache_prune_keeps_an_unfinished_run_changed_in_the_last_hour_and_says_so(synthesis_cache, capsys):
    from optimum_dfq.cli import main

    root, complete, interrupted = synthesis_cache  # both just made
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    assert main(["cache", "prune", "--max-size", "0B", "--yes", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"deleted {complete.name[:12]} (complete, psaq, {sizes[complete]} MB)",
        f"freed {sizes[complete]} MB in {root}",
        (f"kept {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB): not complete and changed in the "
         f"last hour, so a synthesis may still be writing it (`optimum-dfq cache delete {interrupted.name[:12]}` "
         "deletes it)"),
        f"left 1 run, {sizes[interrupted]} MB"]
    assert sorted(path.name for path in root.iterdir()) == sorted([interrupted.name, "my-notes"])


def test_cache_prune_off_a_terminal_needs_yes(synthesis_cache, set_last_change):
    root, complete, interrupted = synthesis_cache
    for run in (complete, interrupted):
        set_last_change(run, 2 * DAY)
    refused = run_cli("cache", "prune", "--older-than", "1d", "--cache-dir", str(root))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (f"optimum-dfq: error: cache prune deletes 2 runs in {root}, and there is no "
                                      "terminal to ask for confirmation: add --yes to confirm. Nothing was deleted.")
    assert len(list(root.iterdir())) == 3


@pytest.mark.parametrize("answer", ["n", "y"])
def test_cache_prune_on_a_terminal_shows_the_runs_and_asks_first(answer, synthesis_cache, set_last_change,
                                                                monkeypatch, capsys):
    from optimum_dfq.cli import main

    root, complete, _ = synthesis_cache
    set_last_change(complete, 40 * DAY)
    size = _megabytes_on_disk(complete)
    questions = []
    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr("builtins.input", lambda question: questions.append(question) or answer)
    assert main(["cache", "prune", "--older-than", "30d", "--cache-dir", str(root)]) == 0
    assert questions == [f"would delete {complete.name[:12]} (complete, psaq, {size} MB)\n"
                         + f"would free {size} MB in {root}\nDelete 1 run? [y/N] "]
    output = capsys.readouterr().out
    if answer == "y":
        assert output.splitlines()[:2] == [f"deleted {complete.name[:12]} (complete, psaq, {size} MB)",
                                           f"freed {size} MB in {root}"]
        assert not complete.exists()
    else:
        assert output == "Cancelled; nothing deleted.\n" and complete.exists()


@pytest.mark.parametrize("flags, reason", [
    ([], "give --older-than DURATION (e.g. 30d) to delete the runs changed before that, and/or --max-size SIZE"),
    (["--older-than", "30 days"], "--older-than '30 days' is not an age: give a number and a unit, s, m, h, d or w"),
    (["--max-size", "5G"], "--max-size '5G' is not a size: give a number and a unit, B, KB, MB, GB, TB"),
    (["--older-than", "1s", "--dry-run", "--yes"], "--yes confirms deleting; --dry-run deletes nothing and asks"),
])
def test_cache_prune_refuses_a_missing_or_ill_formed_rule_in_one_line_and_deletes_nothing(flags, reason,
                                                                                         synthesis_cache,
                                                                                         set_last_change, capsys):
    from optimum_dfq.cli import main

    root = synthesis_cache[0]
    for path in root.iterdir():
        set_last_change(path, 40 * DAY)  # every run would go
    assert main(["cache", "prune", *flags, "--cache-dir", str(root)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("optimum-dfq: error: "), error
    assert reason in error[0] and captured.out == "", error
    assert len(list(root.iterdir())) == 3


def test_cache_commands_show_a_run_a_synthesis_is_using_and_never_delete_it(synthesis_cache, hold_run,
                                                                           set_last_change, capsys):
    from optimum_dfq.cli import main

    root, complete, interrupted = synthesis_cache
    holder = hold_run(interrupted)
    for run in (complete, interrupted):
        set_last_change(run, 40 * DAY)  # past any age, and the one-hour rule
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    listed = run_cli("cache", "list", "--cache-dir", str(root))
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:4]}
    assert rows[interrupted.name[:12]][:5] == [interrupted.name[:12], "partial", "(running)", "psaq", "2/6"]
    assert rows[complete.name[:12]][:3] == [complete.name[:12], "complete", "psaq"]
    total = _megabytes_on_disk(complete, interrupted, root / "my-notes")
    assert listed.stdout.splitlines()[-1] == (f"3 entries (1 complete, 1 partial, 1 unknown; 1 running), {total} MB "
                                              f"in {root}")

    assert main(["cache", "delete", interrupted.name[:8], "--cache-dir", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [(
        f"optimum-dfq: error: The synthesis run {interrupted.name[:12]} in {root} is in use by a synthesis going on, "
        "so not deleted: wait for it to end, or stop it, then delete again. Nothing was deleted.")]
    assert main(["cache", "prune", "--older-than", "30d", "--yes", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"deleted {complete.name[:12]} (complete, psaq, {sizes[complete]} MB)",
        f"freed {sizes[complete]} MB in {root}",
        (f"kept {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB): a synthesis is using it; wait for "
         "it to end, or stop it, to delete it"),
        f"left 1 run, {sizes[interrupted]} MB"]
    assert sorted(path.name for path in root.iterdir()) == sorted([interrupted.name, "my-notes"])

    holder.end()
    assert main(["cache", "delete", interrupted.name[:8], "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"deleted {interrupted.name[:12]} (partial, psaq,")
    assert [path.name for path in root.iterdir()] == ["my-notes"]


def test_cache_delete_all_skips_the_runs_a_synthesis_is_using_and_says_so(synthesis_cache, hold_run, monkeypatch,
                                                                          capsys):
    from optimum_dfq.cli import main

    root, complete, interrupted = synthesis_cache
    hold_run(complete)  # a synthesis loading the finished set
    questions = []
    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr("builtins.input", lambda question: questions.append(question) or "y")
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    assert main(["cache", "delete", "--all", "--cache-dir", str(root)]) == 0
    assert questions == [(f"Delete every synthesis run in {root} but the 1 run in use: 1 run, {sizes[interrupted]} "
                          "MB? [y/N] ")]
    skipped = (f"skipped {complete.name[:12]} (complete, psaq, {sizes[complete]} MB): a synthesis is using it; wait "
               "for it to end, or stop it, to delete it")
    assert capsys.readouterr().out.splitlines() == [
        f"deleted {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB)",
        f"freed {sizes[interrupted]} MB in {root}", skipped, "left 1 entry that is no synthesis run: my-notes"]
    assert sorted(path.name for path in root.iterdir()) == sorted([complete.name, "my-notes"])

    assert main(["cache", "delete", "--all", "--yes", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        skipped, f"No synthesis runs cached in {root} but those in use; nothing deleted."]
    assert len(questions) == 1 and complete.exists()


@pytest.mark.parametrize("answer, confirmed", [("Y", True), (" yes ", True), ("yeah", False), (EOFError, False)])
def test_only_y_or_yes_in_any_case_confirms_a_deletion(answer, confirmed, synthesis_cache, set_last_change,
                                                       monkeypatch, capsys):
    from optimum_dfq.cli import main

    root, complete, _ = synthesis_cache
    set_last_change(complete, 40 * DAY)

    def terminal(question):
        if answer is EOFError:  # Ctrl-D
            raise EOFError
        return answer

    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr("builtins.input", terminal)
    assert main(["cache", "prune", "--older-than", "30d", "--cache-dir", str(root)]) == 0
    output = capsys.readouterr().out
    assert complete.exists() != confirmed
    assert (output == "Cancelled; nothing deleted.\n") != confirmed


def test_cache_prune_deletes_only_the_runs_it_showed_when_one_is_used_meanwhile(synthesis_cache, hold_run,
                                                                               set_last_change, monkeypatch, capsys):
    from optimum_dfq.cli import main

    root, complete, interrupted = synthesis_cache
    set_last_change(interrupted, 3 * HOUR)
    set_last_change(complete, 2 * HOUR)
    sizes = {run: _megabytes_on_disk(run) for run in (complete, interrupted)}
    total = _megabytes_on_disk(complete, interrupted)

    def resume_while_asked(question):  # a synthesis resumes the run shown while the user reads the question
        assert question.startswith(f"would delete {interrupted.name[:12]} ")
        hold_run(interrupted)
        return "y"

    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr("builtins.input", resume_while_asked)
    limit = f"{_bytes_on_disk(complete)}B"  # room for the complete run only: the older, interrupted one is shown
    assert main(["cache", "prune", "--max-size", limit, "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"freed 0.0 MB in {root}",
        (f"kept {interrupted.name[:12]} (partial, psaq, {sizes[interrupted]} MB): a synthesis is using it; wait for "
         "it to end, or stop it, to delete it"),
        f"left 2 runs, {total} MB"]
    assert sorted(path.name for path in root.iterdir()) == sorted([complete.name, interrupted.name, "my-notes"])


def test_cache_commands_take_a_cache_folder_given_with_a_tilde_in_the_home_folder(synthesis_cache, monkeypatch,
                                                                                   capsys):
    from optimum_dfq.cli import main

    root = synthesis_cache[0]
    monkeypatch.setenv("HOME", str(root.parent))
    assert main(["cache", "list", "--cache-dir", f"~/{root.name}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f" MB in {root}")
    shutil.rmtree(root)
    root.mkdir()
    assert main(["cache", "list", "--cache-dir", f"~/{root.name}"]) == 0
    assert capsys.readouterr().out == f"No synthesis runs cached in {root} (the folder is empty).\n"
