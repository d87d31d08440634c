"""Listing and deleting the runs of a synthesis cache, on folders written by real (tiny) syntheses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from synth_helpers import FAST, NORM, one_thread, tiny_vit  # noqa: F401

from optimum_dfq.synthesis import cache_admin, get_synthesizer, pixel_synthesizer
from optimum_dfq.synthesis.cache_admin import (
    BatchProgress,
    CacheKeyError,
    CachePruneError,
    CacheRunLiveError,
    delete_cached_runs,
    list_cached_runs,
    parse_duration,
    parse_size,
    prune_cached_runs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_NAME = "tiny/vit-for-tests"
HOUR, DAY = 3600, 86400


def _du(path: Path) -> int:
    """Bytes of the regular files under `path`, as `du --apparent-size --bytes` adds them up."""
    return sum(entry.lstat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def _latest_change(path: Path) -> float:
    return max(entry.lstat().st_mtime for entry in [path, *path.rglob("*")])


def _ctrl_c_after(monkeypatch, steps: int) -> None:
    """Ctrl-C once the run has done `steps` optimisation steps in all (the batch being optimised is checkpointed)."""
    real, done = pixel_synthesizer.optimize_batch, [0]

    class Progress:
        def update(self, count):
            done[0] += count
            if done[0] == steps:
                raise KeyboardInterrupt

    monkeypatch.setattr(pixel_synthesizer, "optimize_batch",
                        lambda *args, progress=None, **kwargs: real(*args, progress=Progress(), **kwargs))


def _named_model():
    model = tiny_vit()
    model.config._name_or_path = MODEL_NAME  # provenance only: recorded in run.json, not hashed
    return model


def _run_dir(root: Path, seed: int) -> Path:
    (found,) = [path.parent for path in root.glob("*/run.json") if f'"seed": {seed}' in path.read_text()]
    return found


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """A cache holding a complete run (4 images, seed 0) and a run interrupted by Ctrl-C at step 2 of its second batch
    (6 images, seed 1: images 0-1 finished, 2-3 checkpointed)."""
    root = tmp_path / "cache"
    get_synthesizer("psaq", **FAST).synthesize(_named_model(), 4, seed=0, batch_size=2, cache_dir=root, **NORM)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _ctrl_c_after(patch, 4 + 2)  # FAST optimises 4 steps a batch
        get_synthesizer("psaq", **FAST).synthesize(_named_model(), 6, seed=1, batch_size=2, cache_dir=root, **NORM)
    return root


def test_a_complete_and_an_interrupted_run_are_listed_with_their_progress_and_size(cache_root):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    runs = {run.key: run for run in list_cached_runs(cache_root)}
    assert set(runs) == {complete_dir.name, interrupted_dir.name}

    complete = runs[complete_dir.name]
    assert (complete.status, complete.synthesizer, complete.model) == ("complete", "psaq", MODEL_NAME)
    assert (complete.num_images, complete.images_done, complete.seed, complete.checkpoints) == (4, 4, 0, ())
    assert complete.size_bytes == _du(complete_dir) > 0
    assert complete.modified == _latest_change(complete_dir)
    assert complete.path == complete_dir and complete.is_run and complete.reason is None

    interrupted = runs[interrupted_dir.name]
    assert (interrupted.status, interrupted.num_images, interrupted.images_done) == ("partial", 6, 2)
    assert interrupted.seed == 1
    assert interrupted.checkpoints == (BatchProgress(start=2, stop=4, step=2),)
    assert interrupted.size_bytes == _du(interrupted_dir) > 0
    assert interrupted.modified == _latest_change(interrupted_dir)


def test_images_in_batches_of_two_grids_are_counted_once(tmp_path):
    def stop_after_first_batch(record):
        raise KeyboardInterrupt

    for batch_size in (2, 3):  # the second run ignores the first one's batch, which lies on another grid
        with pytest.raises(KeyboardInterrupt):
            get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 6, seed=0, batch_size=batch_size,
                                                       cache_dir=tmp_path, on_batch_end=stop_after_first_batch, **NORM)
    (run,) = list_cached_runs(tmp_path)
    assert sorted(path.name for path in (run.path / "shards").iterdir()) == ["00000000-00000002.safetensors",
                                                                           "00000000-00000003.safetensors"]
    assert (run.status, run.images_done, run.num_images) == ("partial", 3, 6)


def test_a_run_described_but_not_begun_is_empty(cache_root):
    empty_dir = _run_dir(cache_root, 1)
    shutil.rmtree(empty_dir / "shards")
    shutil.rmtree(empty_dir / "partial")
    (run,) = [run for run in list_cached_runs(cache_root) if run.key == empty_dir.name]
    assert (run.status, run.images_done, run.num_images, run.checkpoints) == ("empty", 0, 6, ())


def test_entries_that_are_not_runs_are_listed_as_unknown_with_the_reason(cache_root):
    stray = cache_root / "my-notes"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a run")
    (cache_root / "README").write_text("a file")
    garbled = cache_root / ("ab" * 32)
    shutil.copytree(_run_dir(cache_root, 0), garbled)
    (garbled / "run.json").write_text("{not json")
    no_description = cache_root / ("cd" * 32)
    shutil.copytree(_run_dir(cache_root, 0), no_description)
    (no_description / "run.json").unlink()

    runs = list_cached_runs(cache_root)
    assert [run.status for run in runs[2:]] == ["unknown"] * 4  # runs first, latest change first
    assert {run.status for run in runs[:2]} == {"complete", "partial"} and runs[0].modified >= runs[1].modified
    unknown = {run.key: run for run in runs if run.status == "unknown"}
    assert set(unknown) == {"my-notes", "README", garbled.name, no_description.name}
    assert "its name is no run key" in unknown["my-notes"].reason and not unknown["my-notes"].is_run
    assert unknown["my-notes"].size_bytes == len("not a run")
    assert "not a folder" in unknown["README"].reason and not unknown["README"].is_run
    assert unknown[garbled.name].reason.startswith("unreadable run.json (JSONDecodeError")
    assert "no run.json" in unknown[no_description.name].reason
    assert unknown[garbled.name].is_run and unknown[no_description.name].is_run  # named by a run key: deletable
    assert unknown[garbled.name].size_bytes == _du(garbled)


def test_probe_files_of_a_multi_process_synthesis_are_neither_listed_nor_deleted(cache_root):
    # a probe lives for the instant a multi-process synthesis checks that the folder is shared; one left by a killed
    # process must not show as an unknown entry of `cache list`, nor be taken for a run
    main_probe = cache_root / ".optimum_dfq-probe-0123456789abcdef0123456789abcdef"
    other_probe = cache_root / f"{main_probe.name}-1"
    for probe in (main_probe, other_probe):
        probe.write_text("0123456789abcdef0123456789abcdef")
    look_alike = cache_root / ".optimum_dfq-probe-notes"  # not a probe's name: listed as any stray file is
    look_alike.write_text("mine")

    runs = list_cached_runs(cache_root)
    assert {run.key for run in runs} == {_run_dir(cache_root, 0).name, _run_dir(cache_root, 1).name, look_alike.name}
    delete_cached_runs(cache_root, delete_all=True)
    assert sorted(path.name for path in cache_root.iterdir()) == sorted([main_probe.name, other_probe.name,
                                                                         look_alike.name])


def test_a_missing_cache_lists_nothing_and_a_file_is_refused(tmp_path):
    assert list_cached_runs(tmp_path / "missing") == []
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a synthesis cache folder"):
        list_cached_runs(tmp_path / "file")


def test_delete_by_prefix_removes_exactly_that_run_and_reports_the_bytes(cache_root):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    size = _du(interrupted_dir)
    deletion = delete_cached_runs(cache_root, [interrupted_dir.name[:8].upper()])
    assert [run.key for run in deletion.removed] == [interrupted_dir.name]
    assert deletion.freed_bytes == size
    assert not interrupted_dir.exists()
    assert [path.name for path in cache_root.iterdir()] == [complete_dir.name]
    assert _du(complete_dir) > 0


def test_a_key_named_twice_is_deleted_once(cache_root):
    key = _run_dir(cache_root, 0).name
    deletion = delete_cached_runs(cache_root, [key, key[:6]])
    assert [run.key for run in deletion.removed] == [key]


@pytest.mark.parametrize("prefix, message", [
    ("ambiguous", r"matches 2 runs in .* \((?P<keys>[0-9a-f]{12}, [0-9a-f]{12})\): give more characters"),
    ("unmatched", r"No synthesis run in .* has a key starting with '.*'; `optimum-dfq cache list` shows the keys"),
    ("short", r"The key prefix '.{3}' is too short: give at least 4 characters"),
    ("stray", r"my-notes is not a synthesis run \(its name is no run key\), so it is not deleted"),
])
def test_a_prefix_that_does_not_name_one_run_is_refused_and_nothing_is_deleted(prefix, message, cache_root):
    complete_key = _run_dir(cache_root, 0).name
    twin = cache_root / (complete_key[:6] + ("0" if complete_key[6] != "0" else "1") * 58)
    shutil.copytree(cache_root / complete_key, twin)
    (cache_root / "my-notes").mkdir()
    keys = {path.name for path in cache_root.iterdir()}
    unused = next(candidate for candidate in ("ffff", "eeee", "dddd") if not any(k.startswith(candidate) for k in keys))
    given = {"ambiguous": complete_key[:6], "unmatched": unused, "short": complete_key[:3], "stray": "my-notes"}[prefix]
    with pytest.raises(CacheKeyError, match=message) as refusal:
        delete_cached_runs(cache_root, [_run_dir(cache_root, 1).name, given])  # the first one alone would be deleted
    if prefix == "ambiguous":
        assert sorted(refusal.value.args[0].split("(")[1].split(")")[0].split(", ")) == sorted(
            [complete_key[:12], twin.name[:12]])
    assert {path.name for path in cache_root.iterdir()} == keys


def test_delete_all_removes_every_run_and_leaves_what_is_not_one(cache_root):
    stray = cache_root / "my-notes"
    stray.mkdir()
    garbled = cache_root / ("ab" * 32)
    garbled.mkdir()
    (garbled / "run.json").write_text("{not json")
    expected = {path.name: _du(path) for path in cache_root.iterdir() if path != stray}
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert {run.key for run in deletion.removed} == set(expected)
    assert deletion.freed_bytes == sum(expected.values())
    assert [path.name for path in cache_root.iterdir()] == ["my-notes"]


@pytest.mark.parametrize("keys, delete_all", [([], False), (["abcd"], True)])
def test_delete_needs_keys_or_all_but_not_both(keys, delete_all, cache_root):
    with pytest.raises(CacheKeyError, match="Name the runs to delete"):
        delete_cached_runs(cache_root, keys, delete_all=delete_all)
    assert len(list(cache_root.iterdir())) == 2


def test_a_run_that_cannot_be_removed_is_reported_with_those_already_removed(cache_root, monkeypatch):
    first, second = sorted(path.name for path in cache_root.iterdir())
    real = shutil.rmtree

    def refuse_the_second(path, *args, **kwargs):
        if second in Path(path).parts:  # a run folder is deleted entry by entry
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refuse_the_second)
    with pytest.raises(OSError, match=rf"Could not delete the cached run .*{second}.*already deleted: {first[:12]}\."):
        delete_cached_runs(cache_root, [first, second])
    assert [path.name for path in cache_root.iterdir()] == [second]


def test_a_folder_named_like_a_key_but_holding_other_files_is_never_deleted(cache_root):
    # other tools name folders by a SHA-256 too (datasets' downloads/extracted/<sha256>/, say): a --cache-dir given by
    # mistake there lost all of them to `cache delete --all`
    extracted = cache_root / ("e" * 64)
    (extracted / "train").mkdir(parents=True)
    (extracted / "train" / "data.arrow").write_text("someone else's data")
    (extracted / "README.md").write_text("not a run")
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == extracted.name]
    assert (found.status, found.is_run) == ("unknown", False)
    assert found.reason == "not a synthesis run: it holds README.md, train, which no synthesis run writes"
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert extracted.name not in {run.key for run in deletion.removed} and len(deletion.removed) == 2
    assert (extracted / "train" / "data.arrow").read_text() == "someone else's data"
    with pytest.raises(CacheKeyError, match=r"is not a synthesis run \(it holds README.md, train, which no synthesis "
                                            r"run writes\), so it is not deleted"):
        delete_cached_runs(cache_root, [extracted.name])
    assert extracted.exists()


def test_prune_older_than_deletes_the_runs_last_changed_before_that_age_complete_or_not(cache_root, set_last_change):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    set_last_change(complete_dir, 40 * DAY)
    set_last_change(interrupted_dir, 2 * DAY)
    complete_size, interrupted_size = _du(complete_dir), _du(interrupted_dir)
    pruning = prune_cached_runs(cache_root, older_than="30d")
    assert [(run.key, run.status) for run in pruning.removed] == [(complete_dir.name, "complete")]
    assert pruning.freed_bytes == complete_size and not pruning.dry_run and pruning.kept == ()
    assert [run.key for run in pruning.left] == [interrupted_dir.name] and pruning.size_left == interrupted_size
    assert [path.name for path in cache_root.iterdir()] == [interrupted_dir.name]

    pruning = prune_cached_runs(cache_root, older_than=DAY)  # seconds
    assert [(run.key, run.status) for run in pruning.removed] == [(interrupted_dir.name, "partial")]
    assert pruning.freed_bytes == interrupted_size and pruning.left == ()
    assert list(cache_root.iterdir()) == []


@pytest.mark.parametrize("older", ["complete", "interrupted"])
def test_prune_max_size_deletes_the_least_recently_changed_runs_until_the_rest_fits(older, cache_root,
                                                                                   set_last_change):
    runs = {"complete": _run_dir(cache_root, 0), "interrupted": _run_dir(cache_root, 1)}
    newer = "interrupted" if older == "complete" else "complete"
    set_last_change(runs[older], 3 * HOUR)
    set_last_change(runs[newer], 2 * HOUR)
    total = _du(runs[older]) + _du(runs[newer])
    assert prune_cached_runs(cache_root, max_size=total).removed == ()  # at most SIZE: nothing to delete
    assert len(list(cache_root.iterdir())) == 2

    pruning = prune_cached_runs(cache_root, max_size=total - 1)
    assert [run.key for run in pruning.removed] == [runs[older].name]
    assert pruning.size_left == _du(runs[newer]) and [run.key for run in pruning.left] == [runs[newer].name]
    assert [path.name for path in cache_root.iterdir()] == [runs[newer].name]


def test_prune_never_deletes_an_unfinished_run_changed_in_the_last_hour(cache_root, set_last_change):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    set_last_change(interrupted_dir, 50 * 60)  # a synthesis may still be writing it; the complete run was just made
    size = _du(interrupted_dir)
    by_age = prune_cached_runs(cache_root, older_than="10m")
    assert by_age.removed == () and [run.key for run in by_age.kept] == [interrupted_dir.name]
    pruning = prune_cached_runs(cache_root, max_size="0B")
    assert [run.key for run in pruning.removed] == [complete_dir.name]  # finished: not protected, however recent
    assert [(run.key, run.status) for run in pruning.kept] == [(interrupted_dir.name, "partial")]
    assert [run.key for run in pruning.left] == [interrupted_dir.name] and pruning.size_left == size
    assert [path.name for path in cache_root.iterdir()] == [interrupted_dir.name]

    set_last_change(interrupted_dir, 70 * 60)
    pruning = prune_cached_runs(cache_root, max_size=0)
    assert [run.key for run in pruning.removed] == [interrupted_dir.name] and pruning.kept == ()
    assert list(cache_root.iterdir()) == []


def test_a_dry_run_prunes_nothing_and_says_what_would_go(cache_root, set_last_change):
    for path in cache_root.iterdir():
        set_last_change(path, 2 * DAY)
    before = {path.name: _du(path) for path in cache_root.iterdir()}
    pruning = prune_cached_runs(cache_root, older_than="1d", dry_run=True)
    assert pruning.dry_run and {run.key for run in pruning.removed} == set(before)
    assert pruning.freed_bytes == sum(before.values()) and pruning.left == ()
    assert {path.name: _du(path) for path in cache_root.iterdir()} == before


def test_prune_neither_deletes_nor_counts_entries_that_are_not_runs(cache_root, set_last_change):
    stray = cache_root / "my-notes"
    stray.mkdir()
    (stray / "big.bin").write_bytes(bytes(1_000_000))
    extracted = cache_root / ("e" * 64)  # named like a run, holding what no run writes
    extracted.mkdir()
    (extracted / "data.arrow").write_bytes(bytes(1_000_000))
    for path in cache_root.iterdir():
        set_last_change(path, 40 * DAY)
    runs_size = _du(_run_dir(cache_root, 0)) + _du(_run_dir(cache_root, 1))
    assert prune_cached_runs(cache_root, max_size=runs_size).removed == ()
    pruning = prune_cached_runs(cache_root, older_than="30d", max_size=0)
    assert len(pruning.removed) == 2 and pruning.freed_bytes == runs_size and pruning.size_left == 0
    assert sorted(path.name for path in cache_root.iterdir()) == sorted([stray.name, extracted.name])
    assert _du(stray) == _du(extracted) == 1_000_000


@pytest.mark.parametrize("text, seconds", [("30d", 30 * DAY), ("12h", 12 * HOUR), ("90m", 5400), ("45s", 45),
                                           ("2w", 14 * DAY), ("1.5h", 5400), (" 7 d ", 7 * DAY), ("0s", 0)])
def test_an_age_is_a_number_and_a_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "30 days", "1M", "-1d", "d", "1.2.3h", ""])
def test_an_ill_formed_age_is_refused_with_the_accepted_forms(text):
    with pytest.raises(CachePruneError, match=r"^--older-than '.*' is not an age: give a number and a unit, s, m, h, "
                                              r"d or w \(e\.g\. 30d, 12h, 90m\)\.$"):
        parse_duration(text, "--older-than")


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("500mb", 500 * 10**6),
                                        ("2GiB", 2 * 2**30), ("1.5KiB", 1536), ("1 TB", 10**12), ("0B", 0),
                                        ("100b", 100)])
def test_a_size_is_a_number_and_a_unit(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5", "5G", "5 gigabytes", "-5GB", "GB", "5iB", "5PB"])
def test_an_ill_formed_size_is_refused_with_the_accepted_forms(text):
    with pytest.raises(CachePruneError, match=r"^max_size '.*' is not a size: give a number and a unit, B, KB, MB, "
                                              r"GB, TB \(powers of 1000, .*\) or KiB, MiB, GiB, TiB "
                                              r"\(powers of 1024\), e\.g\. 5GB, 500MB\.$"):
        parse_size(text)


@pytest.mark.parametrize("rules, message", [
    ({}, "Give older_than (an age, e.g. '30d') and/or max_size (a size, e.g. '5GB')"),
    ({"older_than": -1}, "older_than must be an age of at least 0 seconds; got -1."),
    ({"max_size": -1}, "max_size must be a size of at least 0 bytes; got -1."),
    ({"older_than": True}, "older_than True is not an age"),
    ({"max_size": 1.5}, "max_size 1.5 is not a size"),
])
def test_prune_without_a_rule_or_with_a_bad_number_deletes_nothing(rules, message, cache_root):
    with pytest.raises(CachePruneError) as refusal:
        prune_cached_runs(cache_root, **rules)
    assert message in str(refusal.value)
    assert len(list(cache_root.iterdir())) == 2


def test_a_run_held_by_a_synthesis_is_live_and_neither_deleted_nor_pruned_however_old(cache_root, hold_run,
                                                                                     set_last_change):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    holder = hold_run(interrupted_dir)
    for path in (complete_dir, interrupted_dir):
        set_last_change(path, 40 * DAY)  # past any age, and the one-hour rule
    runs = {run.key: run for run in list_cached_runs(cache_root)}
    assert runs[interrupted_dir.name].live and not runs[complete_dir.name].live
    assert runs[interrupted_dir.name].status == "partial"

    with pytest.raises(CacheRunLiveError, match=rf"^The synthesis run {interrupted_dir.name[:12]} in {cache_root} is "
                                                r"in use by a synthesis going on, so not deleted: wait for it to end, "
                                                r"or stop it, then delete again\. Nothing was deleted\.$"):
        delete_cached_runs(cache_root, [complete_dir.name, interrupted_dir.name[:8]])  # the first alone would go
    assert complete_dir.exists() and interrupted_dir.exists()

    plan = prune_cached_runs(cache_root, older_than="30d", max_size=0, dry_run=True)  # what `cache prune` shows
    assert [run.key for run in plan.removed] == [complete_dir.name]
    assert [(run.key, run.live) for run in plan.kept] == [(interrupted_dir.name, True)]
    pruning = prune_cached_runs(cache_root, older_than="30d", max_size=0)
    assert [run.key for run in pruning.removed] == [complete_dir.name]
    assert [(run.key, run.live) for run in pruning.kept] == [(interrupted_dir.name, True)]
    assert pruning.skipped == pruning.kept and [run.key for run in pruning.left] == [interrupted_dir.name]
    assert [path.name for path in cache_root.iterdir()] == [interrupted_dir.name]

    holder.end()  # the synthesis ended: the same run is no longer live, and goes
    (run,) = list_cached_runs(cache_root)
    assert not run.live and (interrupted_dir / "run.lock").exists()
    assert [run.key for run in delete_cached_runs(cache_root, [interrupted_dir.name[:8]]).removed] == [run.key]
    assert list(cache_root.iterdir()) == []


def test_delete_all_skips_a_live_run(cache_root, hold_run):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    hold_run(complete_dir)  # a synthesis loading a finished set holds it too
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert [run.key for run in deletion.removed] == [interrupted_dir.name]
    assert [(run.key, run.live) for run in deletion.skipped] == [(complete_dir.name, True)]
    assert [path.name for path in cache_root.iterdir()] == [complete_dir.name]
    assert _du(complete_dir) > 0 and (complete_dir / "calibration_set").is_dir()


def test_a_lock_file_left_by_a_killed_synthesis_does_not_make_the_run_live(cache_root, hold_run, set_last_change):
    interrupted_dir = _run_dir(cache_root, 1)
    hold_run(interrupted_dir).kill()  # a crash: the OS drops the lock, the file stays
    assert (interrupted_dir / "run.lock").exists()
    set_last_change(interrupted_dir, 2 * HOUR)
    (run,) = [run for run in list_cached_runs(cache_root) if run.key == interrupted_dir.name]
    assert not run.live and run.status == "partial" and run.is_run
    pruning = prune_cached_runs(cache_root, older_than="1h")
    assert [run.key for run in pruning.removed] == [interrupted_dir.name] and pruning.kept == ()
    assert not interrupted_dir.exists()


def test_a_run_found_live_when_it_is_deleted_is_skipped(cache_root, hold_run, monkeypatch):
    # a synthesis starting between the listing and the deletion: the deletion's own lock sees it
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    listed = list_cached_runs(cache_root)
    monkeypatch.setattr(cache_admin, "list_cached_runs", lambda root: listed)
    hold_run(interrupted_dir)
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert [run.key for run in deletion.removed] == [complete_dir.name]
    assert [(run.key, run.live) for run in deletion.skipped] == [(interrupted_dir.name, True)]
    assert [path.name for path in cache_root.iterdir()] == [interrupted_dir.name]


def test_a_synthesis_going_on_is_live_until_it_ends_however_it_ends(tmp_path):
    seen = []

    def probe(record):
        (run,) = list_cached_runs(tmp_path)
        seen.append(run.live)
        with pytest.raises(CacheRunLiveError):
            delete_cached_runs(tmp_path, [run.key])
        assert prune_cached_runs(tmp_path, max_size=0).kept == (run,)
        if record.start == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped after its second batch: the lock goes with it
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=probe, **NORM)
    assert seen == [True, True]
    (run,) = list_cached_runs(tmp_path)
    assert (run.status, run.images_done, run.live) == ("partial", 4, False)

    calibration = get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                             on_batch_end=probe, **NORM)  # resumes, then finishes
    assert seen == [True, True, True] and len(calibration) == 6
    (run,) = list_cached_runs(tmp_path)
    assert (run.status, run.live) == ("complete", False)
    assert [gone.key for gone in delete_cached_runs(tmp_path, [run.key]).removed] == [run.key]


def test_folders_named_almost_like_a_run_key_are_unknown_and_never_deleted(cache_root):
    # a run key is exactly 64 lower-case hexadecimal digits: a copy of a run under another name is not a run
    key = _run_dir(cache_root, 0).name
    look_alikes = [key + "0", key[:63], key.upper(), key + ".bak"]
    for name in look_alikes:
        shutil.copytree(cache_root / key, cache_root / name)
    unknown = {run.key: run for run in list_cached_runs(cache_root) if run.key in look_alikes}
    assert set(unknown) == set(look_alikes)
    for run in unknown.values():
        assert (run.status, run.is_run) == ("unknown", False)
        assert run.reason == "not a synthesis run: its name is no run key (64 hexadecimal digits)"
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert len(deletion.removed) == 2
    assert sorted(path.name for path in cache_root.iterdir()) == sorted(look_alikes)


@pytest.mark.parametrize("name", ["run.json.orig", "shards-old", "partial.bak", "calibration_set.npz",
                                  "calibration_set.damaged-notes", "run.lock~"])
def test_a_run_folder_holding_a_file_named_almost_like_a_run_file_is_not_a_run(name, cache_root):
    run_dir = _run_dir(cache_root, 0)
    (run_dir / name).write_text("someone else's")
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == run_dir.name]
    assert (found.status, found.is_run) == ("unknown", False)
    assert found.reason == f"not a synthesis run: it holds {name}, which no synthesis run writes"
    delete_cached_runs(cache_root, delete_all=True)
    assert [path.name for path in cache_root.iterdir()] == [run_dir.name]
    assert (run_dir / name).read_text() == "someone else's"


def test_the_reason_names_three_foreign_entries_at_most(cache_root):
    run_dir = _run_dir(cache_root, 0)
    for name in ("a", "b", "c", "d"):
        (run_dir / name).write_text("")
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == run_dir.name]
    assert found.reason == "not a synthesis run: it holds a, b, c, ..., which no synthesis run writes"


def test_prune_keeps_a_recent_empty_run_and_a_recent_run_with_an_unreadable_description(cache_root):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    shutil.rmtree(interrupted_dir / "shards")
    shutil.rmtree(interrupted_dir / "partial")  # described, nothing synthesized yet
    garbled = cache_root / ("ab" * 32)
    shutil.copytree(complete_dir, garbled)
    (garbled / "run.json").write_text("{not json")  # may be a run going on where locks are unavailable
    pruning = prune_cached_runs(cache_root, max_size=0)
    assert [run.key for run in pruning.removed] == [complete_dir.name]
    assert sorted((run.key, run.status) for run in pruning.kept) == sorted([(interrupted_dir.name, "empty"),
                                                                          (garbled.name, "unknown")])
    assert sorted(path.name for path in cache_root.iterdir()) == sorted([interrupted_dir.name, garbled.name])


def test_a_run_found_live_when_it_is_pruned_is_kept(cache_root, hold_run, set_last_change, monkeypatch):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    for path in (complete_dir, interrupted_dir):
        set_last_change(path, 2 * DAY)
    listed = list_cached_runs(cache_root)
    monkeypatch.setattr(cache_admin, "list_cached_runs", lambda root: listed)
    hold_run(interrupted_dir)  # a synthesis resumes it between the listing and the deletion
    pruning = prune_cached_runs(cache_root, older_than="1d")
    assert [run.key for run in pruning.removed] == [complete_dir.name]
    assert [(run.key, run.live) for run in pruning.kept] == [(interrupted_dir.name, True)]
    assert pruning.skipped == pruning.kept and [run.key for run in pruning.left] == [interrupted_dir.name]
    assert [path.name for path in cache_root.iterdir()] == [interrupted_dir.name]


def test_a_run_deleted_meanwhile_by_another_process_counts_as_deleted(cache_root, monkeypatch):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    listed = list_cached_runs(cache_root)
    monkeypatch.setattr(cache_admin, "list_cached_runs", lambda root: listed)
    shutil.rmtree(interrupted_dir)  # another `cache delete` between the listing and the deletion
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert {run.key for run in deletion.removed} == {complete_dir.name, interrupted_dir.name}
    assert list(cache_root.iterdir()) == []


def test_a_run_folder_loses_its_lock_file_last(cache_root, monkeypatch):
    # a synthesis starting during the deletion waits on the lock, so the lock file must outlive the rest of the run
    run_dir = _run_dir(cache_root, 1)
    assert (run_dir / "run.lock").exists()
    real_iterdir, real_rmtree, real_unlink = Path.iterdir, shutil.rmtree, Path.unlink
    removed = []

    def lock_first(self):  # whatever order the folder lists its entries in
        return iter(sorted(real_iterdir(self), key=lambda path: path.name != "run.lock"))

    def rmtree(path, *args, **kwargs):
        assert (run_dir / "run.lock").exists(), f"{path} removed after the lock file"
        removed.append(Path(path).name)
        return real_rmtree(path, *args, **kwargs)

    def unlink(self, *args, **kwargs):
        if self.parent == run_dir and self.name != "run.lock":
            assert (run_dir / "run.lock").exists(), f"{self} removed after the lock file"
            removed.append(self.name)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "iterdir", lock_first)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(Path, "unlink", unlink)
    delete_cached_runs(cache_root, [run_dir.name])
    assert sorted(removed) == ["partial", "run.json", "shards"] and not run_dir.exists()


def test_links_are_neither_followed_nor_taken_for_runs(cache_root, tmp_path):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(complete_dir, elsewhere / "run")
    (elsewhere / "data").mkdir()
    (elsewhere / "data" / "big.bin").write_bytes(bytes(1000))
    linked_run = cache_root / ("ab" * 32)
    linked_run.symlink_to(elsewhere / "run", target_is_directory=True)  # a run key naming a link to a run
    (interrupted_dir / "shards").rename(elsewhere / "shards")
    (interrupted_dir / "shards").symlink_to(elsewhere / "shards", target_is_directory=True)
    shards = sorted(path.name for path in (elsewhere / "shards").iterdir())

    runs = {run.key: run for run in list_cached_runs(cache_root)}
    assert (runs[linked_run.name].status, runs[linked_run.name].is_run) == ("unknown", False)
    assert runs[linked_run.name].reason == "not a folder, so not a synthesis run"
    assert runs[linked_run.name].size_bytes == 0  # a link's size is its own, not its target's
    assert runs[interrupted_dir.name].size_bytes == _du(interrupted_dir)  # the shards behind the link not counted
    deletion = delete_cached_runs(cache_root, delete_all=True)
    assert {run.key for run in deletion.removed} == {complete_dir.name, interrupted_dir.name}
    assert [path.name for path in cache_root.iterdir()] == [linked_run.name]
    assert sorted(path.name for path in (elsewhere / "shards").iterdir()) == shards  # the link went, not its target
    assert (elsewhere / "run" / "run.json").exists() and (elsewhere / "data" / "big.bin").exists()


@pytest.mark.parametrize("description", [[], {"seed": 0}])
def test_a_run_json_that_describes_no_run_is_unknown_but_deletable(description, cache_root):
    run_dir = _run_dir(cache_root, 0)
    (run_dir / "run.json").write_text(json.dumps(description))
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == run_dir.name]
    assert (found.status, found.is_run) == ("unknown", True)
    assert found.reason == ("unreadable run.json (ValueError: it does not describe a synthesis run (no 'synthesizer' "
                            "field))")


def test_fields_of_run_json_of_another_form_are_left_out(cache_root):
    run_dir = _run_dir(cache_root, 0)
    info = json.loads((run_dir / "run.json").read_text())
    info.update(model="tiny/vit", num_images="4", seed=True)  # as another version might write them
    (run_dir / "run.json").write_text(json.dumps(info))
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == run_dir.name]
    assert (found.status, found.synthesizer, found.model, found.num_images, found.seed) == (
        "complete", "psaq", None, None, None)


def test_a_run_stopped_in_its_first_batch_is_partial_with_its_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _ctrl_c_after(monkeypatch, 2)  # step 2 of the first batch: nothing finished, one batch checkpointed
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run,) = list_cached_runs(tmp_path)
    assert (run.status, run.images_done, run.checkpoints) == ("partial", 0, (BatchProgress(0, 2, 2),))


def test_a_cache_folder_given_with_a_tilde_is_in_the_home_folder(cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    keys = {path.name for path in cache_root.iterdir()}
    assert {run.key for run in list_cached_runs("~/cache")} == keys
    assert {run.key for run in delete_cached_runs("~/cache", delete_all=True).removed} == keys


def test_a_size_is_rounded_down_to_whole_bytes():
    assert parse_size("1.0007KB") == 1000 and parse_size("0.9B") == 0


def test_names_almost_like_a_probe_file_are_listed(cache_root):
    token = "0123456789abcdef0123456789abcdef"
    names = [f".optimum_dfq-probe-{token}.bak", f".optimum_dfq-probe-{token}-1x", f".optimum_dfq-probe-{token[:31]}"]
    for name in names:
        (cache_root / name).write_text(token)
    assert set(names) <= {run.key for run in list_cached_runs(cache_root)}


def test_delete_skipping_live_runs_deletes_the_others_and_returns_the_live_ones(cache_root, hold_run):
    complete_dir, interrupted_dir = _run_dir(cache_root, 0), _run_dir(cache_root, 1)
    hold_run(interrupted_dir)
    deletion = delete_cached_runs(cache_root, [complete_dir.name[:8], interrupted_dir.name[:8]], skip_live=True)
    assert [run.key for run in deletion.removed] == [complete_dir.name]
    assert [(run.key, run.live) for run in deletion.skipped] == [(interrupted_dir.name, True)]
    assert [path.name for path in cache_root.iterdir()] == [interrupted_dir.name]


def test_a_run_holding_a_temporary_file_left_by_a_killed_write_is_still_a_run(cache_root):
    run_dir = _run_dir(cache_root, 0)
    (run_dir / ".run.json.tmp-0123abcd-4242-x1y2").write_text("{")  # as an interrupted atomic write leaves it
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == run_dir.name]
    assert (found.status, found.is_run) == ("complete", True)
    assert run_dir.name in {run.key for run in delete_cached_runs(cache_root, delete_all=True).removed}
    assert list(cache_root.iterdir()) == []


def test_a_complete_run_has_all_its_images_done_even_without_its_shards(cache_root):
    run_dir = _run_dir(cache_root, 0)
    shutil.rmtree(run_dir / "shards")  # kept only to rebuild a damaged finished set
    (found,) = [run for run in list_cached_runs(cache_root) if run.key == run_dir.name]
    assert (found.status, found.images_done, found.num_images) == ("complete", 4, 4)
