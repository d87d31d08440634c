"""Caching and resuming synthesis runs."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from synth_helpers import FAST, NORM, SYNTHESIZERS, one_thread, tiny_swin, tiny_vit  # noqa: F401

from optimum_dfq import CalibrationSet
from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import cache as cache_module
from optimum_dfq.synthesis import get_synthesizer, pixel_synthesizer, save_calibration_set
from optimum_dfq.synthesis.cache import SynthesisCache

pytestmark = pytest.mark.usefixtures("one_thread")


class _Interrupt(RuntimeError):
    pass


def _count_optimisations(monkeypatch) -> list:
    calls = []
    real = pixel_synthesizer.optimize_batch

    def counting(model, plan, *args, **kwargs):
        calls.append(list(plan.indices))
        return real(model, plan, *args, **kwargs)

    monkeypatch.setattr(pixel_synthesizer, "optimize_batch", counting)
    return calls


@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_interrupted_run_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch):
    model = tiny_vit()
    reference = get_synthesizer(name, **FAST).synthesize(model, 6, seed=0, batch_size=2, **NORM)

    def interrupt_after_second_batch(record):
        if record.start == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        get_synthesizer(name, **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                 on_batch_end=interrupt_after_second_batch, **NORM)
    (run_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["00000000-00000002.safetensors",
                                                                     "00000002-00000004.safetensors"]
    assert not (run_dir / "calibration_set").exists()

    calls = _count_optimisations(monkeypatch)
    resumed = get_synthesizer(name, **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    assert calls == [[4, 5]]
    assert torch.equal(resumed.pixel_values, reference.pixel_values)
    assert torch.equal(resumed.labels, reference.labels)
    if reference.soft_labels is not None:
        assert torch.equal(resumed.soft_labels, reference.soft_labels)
    assert resumed.metadata["loss_history"] == reference.metadata["loss_history"]
    assert (run_dir / "calibration_set").is_dir()


@pytest.mark.parametrize("cached", [True, False])
def test_ctrl_c_keeps_the_finished_batches_and_says_how_to_resume(cached, tmp_path, monkeypatch, caplog):
    real = pixel_synthesizer.optimize_batch

    def ctrl_c_during_the_third_batch(model, plan, *args, **kwargs):
        if plan.indices[0] == 4:
            raise KeyboardInterrupt
        return real(model, plan, *args, **kwargs)

    monkeypatch.setattr(pixel_synthesizer, "optimize_batch", ctrl_c_during_the_third_batch)
    cache_dir = tmp_path if cached else False
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 6, seed=0, batch_size=2, cache_dir=cache_dir, **NORM)
    (message,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    if cached:
        (run_dir,) = tmp_path.iterdir()
        assert len(list((run_dir / "shards").iterdir())) == 2
        assert f"4 of 6 images are cached in {run_dir}" in message
        assert "same arguments (cache_dir, batch_size)" in message
    else:
        assert "not kept" in message and "cache_dir=" in message


def test_the_ctrl_c_warning_counts_only_the_batches_the_run_can_reuse(tmp_path, caplog):
    def ctrl_c_after_first_batch(record):
        raise KeyboardInterrupt

    model = tiny_vit()
    with pytest.raises(KeyboardInterrupt):  # leaves images 0-3 cached on the grid of batch_size=4
        get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=4, cache_dir=tmp_path,
                                                   on_batch_end=ctrl_c_after_first_batch, **NORM)
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=ctrl_c_after_first_batch, **NORM)
    assert "2 of 6 images are cached" in caplog.records[-1].getMessage()  # images 0-3 of batch_size=4 are not reused


def test_default_cache_keeps_an_interrupted_run_that_named_no_cache(default_synthesis_cache, monkeypatch):
    model = tiny_vit()
    reference = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=False, **NORM)
    assert not default_synthesis_cache.exists()  # cache_dir=False kept nothing although the default cache is on

    def interrupt_after_first_batch(record):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2,
                                                   on_batch_end=interrupt_after_first_batch, **NORM)
    (run_dir,) = default_synthesis_cache.iterdir()
    assert [path.name for path in (run_dir / "shards").iterdir()] == ["00000000-00000002.safetensors"]
    calls = _count_optimisations(monkeypatch)
    resumed = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=True, **NORM)
    assert calls == [[2, 3]]
    assert torch.equal(resumed.pixel_values, reference.pixel_values)


@pytest.mark.parametrize("files, num_images, expected", [
    ([], 10, None),
    (["shards/00000000-00000004", "partial/00000004-00000008"], 10, 4),
    (["partial/00000000-00000004"], 10, 4),  # interrupted in its first batch: only a checkpoint tells the grid
    (["shards/00000000-00000004", "partial/00000000-00000002"], 10, None),  # a checkpoint of another grid
    (["shards/00000008-00000010", "shards/00000004-00000008"], 10, 4),
    (["shards/00000000-00000010"], 10, 10),
    (["shards/00000008-00000010"], 10, None),  # a last batch alone: batch size 2, 4 or 8?
    (["shards/00000000-00000004", "shards/00000000-00000002"], 10, None),  # two grids
    (["shards/00000000-00000003", "shards/00000003-00000006"], 10, 3),
    (["shards/00000002-00000005"], 10, None),  # not on the grid of its own size
])
def test_cached_batch_size_is_the_grid_every_cached_batch_lies_on(files, num_images, expected, tmp_path):
    cache = SynthesisCache(tmp_path, "key")
    for name in files:
        path = cache.directory / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert cache.cached_batch_size(num_images) == expected


def test_resume_without_batch_size_takes_the_grid_of_the_cached_batches(tmp_path, monkeypatch, caplog):
    model = tiny_vit()
    reference = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, **NORM)

    def interrupt_after_first_batch(record):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=interrupt_after_first_batch, **NORM)
    calls = _count_optimisations(monkeypatch)
    with caplog.at_level("INFO"):
        resumed = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, cache_dir=tmp_path, **NORM)
    assert calls == [[2, 3], [4, 5]]  # the default would be one batch of 6, discarding the cached one
    assert "batch_size=2 instead of the default 6" in caplog.text
    assert torch.equal(resumed.pixel_values, reference.pixel_values)
    assert resumed.metadata["batch_size"] == 2


def test_default_cache_location_and_switch(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from optimum_dfq.errors import ConfigError
    from optimum_dfq.synthesis.cache import default_cache_dir, resolve_cache_dir

    monkeypatch.delenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE")
    monkeypatch.delenv("OPTIMUM_DFQ_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    assert default_cache_dir() == tmp_path / "hf-home" / "optimum_dfq" / "synthesis"
    assert resolve_cache_dir(None) == resolve_cache_dir(True) == default_cache_dir()
    monkeypatch.setenv("OPTIMUM_DFQ_CACHE", str(tmp_path / "mine"))
    assert resolve_cache_dir(None) == tmp_path / "mine" / "synthesis"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_cache_dir(False) is None
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", value)
        assert resolve_cache_dir(None) is None
        assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"  # only the default is off
    for value in ("0", "false", "off", ""):
        monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", value)
        assert resolve_cache_dir(None) == tmp_path / "mine" / "synthesis"
    monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", "maybe")
    with pytest.raises(ConfigError, match="OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE='maybe' is not a yes/no value"):
        resolve_cache_dir(None)
    for bad in (5, "", 1.5):
        with pytest.raises(ConfigError, match="cache_dir must be a folder, None/True for the default"):
            resolve_cache_dir(bad)


def test_a_cache_folder_given_with_a_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
    # "~/..." (a quoted value in a shell or a config file is not expanded) must not make a folder named "~"
    from optimum_dfq.synthesis.cache import resolve_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE")
    monkeypatch.setenv("OPTIMUM_DFQ_CACHE", "~/dfq-cache")
    assert resolve_cache_dir(None) == tmp_path / "dfq-cache" / "synthesis"
    assert resolve_cache_dir("~/explicit") == tmp_path / "explicit"
    assert SynthesisCache("~/explicit", "key").directory == tmp_path / "explicit" / "key"


def test_a_bad_cache_dir_is_refused_before_any_optimisation(monkeypatch):
    from optimum_dfq.errors import ConfigError

    calls = _count_optimisations(monkeypatch)
    with pytest.raises(ConfigError, match="cache_dir must be a folder"):
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2, seed=0, cache_dir=0, **NORM)
    assert calls == []


class _TwoProcesses:
    num_processes, process_index, is_main_process = 2, 0, True


NOT_SEEN = "sees no probe file that the main process wrote there"
UNSHARED = "(DEFAULT on the main process) is not shared by every process of this run"


def _fake_probe(monkeypatch, unshared: dict[int, str]) -> list:
    """Makes the probe of a shared folder answer `unshared`; returns the folders probed."""
    probed = []

    def probe(state, folder):
        probed.append(folder)
        return dict(unshared)

    monkeypatch.setattr(pixel_synthesizer, "processes_not_sharing", probe)
    return probed


@pytest.mark.parametrize("other_enabled, unshared, reason", [
    (True, {}, None),
    (True, {1: NOT_SEEN}, f"{UNSHARED} (process 1 {NOT_SEEN})"),
    (True, {0: "cannot write there (PermissionError: denied)"},
     f"{UNSHARED} (the main process cannot write there (PermissionError: denied))"),
    (False, {}, "is turned off by OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE on process(es) 1 only"),
])
def test_default_cache_is_only_used_when_every_process_sees_the_probe_in_it(other_enabled, unshared, reason,
                                                                             default_synthesis_cache, monkeypatch,
                                                                             caplog):
    def gather(state, items):  # this process and the other one
        (mine,) = items
        assert mine == (True, None)
        return [mine, (other_enabled, None)]

    monkeypatch.setattr(pixel_synthesizer, "gather_lists", gather)
    probed = _fake_probe(monkeypatch, unshared)
    with caplog.at_level("WARNING"):
        chosen = pixel_synthesizer._default_cache_for_run(_TwoProcesses())
    assert probed == ([default_synthesis_cache] if other_enabled else [])  # the filesystem decides, not host names
    if reason is None:
        assert chosen == default_synthesis_cache and not caplog.records
    else:
        assert chosen is None
        reason = reason.replace("DEFAULT", str(default_synthesis_cache))
        assert f"The default synthesis cache {reason}, so it is not used" in caplog.text
        assert "cache_dir=False (--no-cache) to silence this" in caplog.text


def test_a_default_cache_turned_off_everywhere_is_dropped_without_a_warning_or_a_probe(monkeypatch, caplog):
    # OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE=1 on every machine of a multi-machine run: there is no default cache to drop,
    # yet a warning said it was dropped and told to pass cache_dir=False "to silence this"
    monkeypatch.setattr(pixel_synthesizer, "gather_lists", lambda state, items: [(False, None), (False, None)])
    probed = _fake_probe(monkeypatch, {})
    with caplog.at_level("WARNING"):
        assert pixel_synthesizer._default_cache_for_run(_TwoProcesses()) is None
    assert not caplog.records and probed == []


@pytest.mark.parametrize("mine", ["1", "maybe"])
def test_an_invalid_cache_setting_on_any_process_is_raised_on_every_process(mine, monkeypatch):
    # raised on one process only, before the gather, it would leave the others waiting until the group's timeout
    from optimum_dfq.errors import ConfigError

    monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", mine)
    gathered = []

    def gather(state, items):
        gathered.extend(items)
        return list(items) + [(False, "OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE='perhaps' is not a yes/no value")]

    monkeypatch.setattr(pixel_synthesizer, "gather_lists", gather)
    with pytest.raises(ConfigError, match="is not a yes/no value"):
        pixel_synthesizer._default_cache_for_run(_TwoProcesses())
    assert len(gathered) == 1  # this process took part in the gather, even with its own setting invalid
    assert (gathered[0][1] is not None) == (mine == "maybe")


@pytest.mark.parametrize("cache_dir", [None, True, "folder"])
def test_a_single_process_run_writes_no_probe(cache_dir, default_synthesis_cache, tmp_path, monkeypatch):
    def probe(state, folder):
        raise AssertionError("a single process has no other process to share its cache with")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pixel_synthesizer, "processes_not_sharing", probe)
    get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2, seed=0, cache_dir=cache_dir, **NORM)
    root = tmp_path / "folder" if cache_dir == "folder" else default_synthesis_cache
    (run_dir,) = root.iterdir()  # the run, and nothing else
    assert (run_dir / "calibration_set").is_dir()


def test_an_explicit_cache_dir_that_another_process_does_not_see_is_refused(tmp_path, monkeypatch):
    from optimum_dfq.errors import ConfigError

    probed = _fake_probe(monkeypatch, {1: NOT_SEEN})
    with pytest.raises(ConfigError) as raised:
        pixel_synthesizer._cache_for_run(_TwoProcesses(), tmp_path / "scratch")
    assert probed == [tmp_path / "scratch"]
    message = str(raised.value)
    assert f"The synthesis cache folder {tmp_path / 'scratch'} (cache_dir=) is not shared by every process" in message
    assert f"process 1 {NOT_SEEN}" in message
    assert "a filesystem that every process sees" in message and "cache_dir=False (--no-cache)" in message

    probed = _fake_probe(monkeypatch, {})
    assert pixel_synthesizer._cache_for_run(_TwoProcesses(), tmp_path / "shared") == tmp_path / "shared"
    assert pixel_synthesizer._cache_for_run(_TwoProcesses(), False) is None
    assert probed == [tmp_path / "shared"]  # cache_dir=False: no folder, no probe


def test_an_invalid_cache_setting_is_refused_before_any_optimisation(monkeypatch):
    # not taken for "off": a typo in the variable must not silently keep an interrupted run from resuming
    from optimum_dfq.errors import ConfigError

    monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", "maybe")
    calls = _count_optimisations(monkeypatch)
    with pytest.raises(ConfigError, match="OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE='maybe' is not a yes/no value"):
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2, seed=0, **NORM)
    assert calls == []


def test_a_default_cache_another_process_does_not_see_keeps_nothing(default_synthesis_cache, monkeypatch, caplog):
    class TwoProcesses:  # this process, the main one, and another that does not see its default cache
        num_processes, process_index, is_main_process = 2, 0, True

    def gather(state, items):
        if items and isinstance(items[0], tuple):  # whether each process has a default cache
            return list(items) + [(True, None)]
        raise _Interrupt  # the finished batches, gathered: the run has done its part

    monkeypatch.setattr(pixel_synthesizer, "gather_lists", gather)
    monkeypatch.setattr(pixel_synthesizer, "broadcast_from_main", lambda state, value: value)
    _fake_probe(monkeypatch, {1: NOT_SEEN})
    with pytest.raises(_Interrupt), caplog.at_level("WARNING"):
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 4, seed=0, batch_size=2, state=TwoProcesses(), **NORM)
    assert "is not shared by every process of this run" in caplog.text
    assert not default_synthesis_cache.exists()  # no batch kept where the other process cannot see it


def test_finished_run_is_reused_without_optimising(tmp_path, monkeypatch):
    model = tiny_vit()
    first = get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=0, cache_dir=tmp_path, **NORM)
    calls = _count_optimisations(monkeypatch)
    again = get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=0, cache_dir=tmp_path, batch_size=1, **NORM)
    assert calls == []
    assert torch.equal(again.pixel_values, first.pixel_values) and torch.equal(again.labels, first.labels)
    assert again.metadata == first.metadata

    get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=1, cache_dir=tmp_path, **NORM)
    get_synthesizer("psaq", **dict(FAST, tv_weight=0.1)).synthesize(model, 3, seed=0, cache_dir=tmp_path, **NORM)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=0, cache_dir=tmp_path, **NORM)
    assert len(calls) == 3
    assert len(list(tmp_path.iterdir())) == 4



def test_cache_files_get_the_permissions_of_files_created_normally(tmp_path):
    # temporary files are created owner-only (0600); renamed into place as such, a cache shared with other users
    # (one folder for a team's runs) could not be read by them
    previous = os.umask(0o022)
    try:
        get_synthesizer("psaq", **FAST).synthesize(tiny_vit(), 2, seed=0, cache_dir=tmp_path, batch_size=1, **NORM)
    finally:
        os.umask(previous)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in files)
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o644)}

def test_an_unregistered_subclass_does_not_reuse_its_parents_images(tmp_path, monkeypatch):
    from optimum_dfq.synthesis import PSAQSynthesizer

    class DarkerPSAQ(PSAQSynthesizer):  # inherits name "psaq"; a different method all the same
        def finalize(self, calibration_set):
            calibration_set.pixel_values = calibration_set.pixel_values - 0.1
            return calibration_set

    model = tiny_vit()
    parent = PSAQSynthesizer(**FAST).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    calls = _count_optimisations(monkeypatch)
    child = DarkerPSAQ(**FAST).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    assert calls, "the subclass reused the parent's cached images"
    assert child.metadata["synthesizer_class"].endswith("DarkerPSAQ") and "synthesizer_class" not in parent.metadata
    assert not torch.equal(child.pixel_values, parent.pixel_values)


def _interrupt_after_first_batch(record):
    raise _Interrupt


def test_shards_of_another_batch_size_are_ignored_not_mixed_in(tmp_path, monkeypatch, caplog):
    model = tiny_vit()
    for batch_size in (4, 3):  # two runs of the same key leave overlapping shards 0-4 and 0-3
        with pytest.raises(_Interrupt):
            get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=batch_size, cache_dir=tmp_path,
                                                       on_batch_end=_interrupt_after_first_batch, **NORM)
    (run_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["00000000-00000003.safetensors",
                                                                     "00000000-00000004.safetensors"]
    reference = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=3, **NORM)

    calls = _count_optimisations(monkeypatch)
    with caplog.at_level("INFO", logger="optimum_dfq.synthesis.cache"):
        resumed = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=3, cache_dir=tmp_path,
                                                             **NORM)
    assert calls == [[3, 4, 5]]  # the shard 0-3 of this grid is reused, the shard 0-4 of the other grid ignored
    assert "1 cached batch(es)" in caplog.text and "another batch grid" in caplog.text  # said, not silent
    assert len(resumed) == 6 and torch.equal(resumed.pixel_values, reference.pixel_values)
    again = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, cache_dir=tmp_path, **NORM)
    assert len(again) == 6 and torch.equal(again.pixel_values, reference.pixel_values)
    assert again.metadata["batch_size"] == 3


def test_batches_that_do_not_cover_the_images_exactly_are_refused(tmp_path, monkeypatch):
    model = tiny_vit()
    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=_interrupt_after_first_batch, **NORM)
    real = SynthesisCache.read_shard

    def overlapping(self, start, stop):  # a damaged shard that holds one image too many
        record = real(self, start, stop)
        record.stop += 1
        return record

    monkeypatch.setattr(SynthesisCache, "read_shard", overlapping)
    monkeypatch.setattr(SynthesisCache, "_shard_is_readable", lambda self, start, stop: True)  # damage not seen early
    with pytest.raises(SynthesisError, match="do not match the run's batch grid"):
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "calibration_set").exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "wrong_images", "short"])
def test_a_damaged_shard_is_moved_aside_and_synthesized_again(damage, tmp_path, monkeypatch, caplog):
    model = tiny_vit()
    reference = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, **NORM)

    def interrupt_after_second_batch(record):
        if record.start == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=interrupt_after_second_batch, **NORM)
    (run_dir,) = tmp_path.iterdir()
    shard = run_dir / "shards" / "00000002-00000004.safetensors"
    content = shard.read_bytes()
    if damage == "wrong_images":  # a readable file under the wrong name: images 0-2 where 2-4 belong
        shard.write_bytes((run_dir / "shards" / "00000000-00000002.safetensors").read_bytes())
    elif damage == "short":  # named and labelled images 2-4, but holding one image
        with safe_open(str(shard), framework="pt") as handle:
            header = handle.metadata()
            tensors = {key: handle.get_tensor(key)[:1] for key in handle.keys()}  # noqa: SIM118
        save_file(tensors, str(shard), metadata=header)
    else:  # what a crash can leave behind
        shard.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"")
    damaged_bytes = shard.read_bytes()

    calls = _count_optimisations(monkeypatch)
    with caplog.at_level("WARNING", logger="optimum_dfq.synthesis.cache"):
        resumed = get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                             **NORM)
    assert calls == [[2, 3], [4, 5]]  # the good shard 0-2 is reused, the damaged one synthesized again
    assert torch.equal(resumed.pixel_values, reference.pixel_values)
    aside = run_dir / "shards" / "00000002-00000004.safetensors.damaged"
    assert aside.read_bytes() == damaged_bytes  # kept for inspection, not deleted
    assert str(shard) in caplog.text and "synthesized again" in caplog.text


def test_a_file_damaged_again_is_moved_aside_beside_the_first_damaged_copy(tmp_path):
    cache = SynthesisCache(tmp_path, "key")
    cache.shards.mkdir(parents=True)
    shard = cache.shards / "00000000-00000002.safetensors"
    for garbage in (b"first", b"second"):
        shard.write_bytes(garbage)
        assert cache.finished_chunks([(0, 2)]) == []
    assert (cache.shards / f"{shard.name}.damaged").read_bytes() == b"first"  # never deleted, nor overwritten
    assert (cache.shards / f"{shard.name}.damaged2").read_bytes() == b"second"


@pytest.mark.parametrize("error", [PermissionError, MemoryError])
def test_a_shard_that_fails_to_load_for_another_reason_is_not_taken_for_damaged(error, tmp_path, monkeypatch):
    model = tiny_vit()
    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=_interrupt_after_first_batch, **NORM)

    def failing(self, start, stop):
        raise error("not the file's fault")

    monkeypatch.setattr(SynthesisCache, "read_shard", failing)
    with pytest.raises(error, match="not the file's fault"):
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in (run_dir / "shards").iterdir()] == ["00000000-00000002.safetensors"]  # left in place


def test_a_damaged_finished_set_is_rebuilt_from_the_shards(tmp_path, monkeypatch, caplog):
    model = tiny_vit()
    first = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    (arrow,) = (run_dir / "calibration_set").rglob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])

    calls = _count_optimisations(monkeypatch)
    with caplog.at_level("WARNING", logger="optimum_dfq.synthesis.cache"):
        again = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    assert calls == []  # rebuilt from the shards, no image synthesized again
    assert torch.equal(again.pixel_values, first.pixel_values) and torch.equal(again.labels, first.labels)
    assert (run_dir / "calibration_set.damaged").is_dir() and "calibration_set" in caplog.text
    assert torch.equal(SynthesisCache(tmp_path, run_dir.name).load_complete().pixel_values, first.pixel_values)


def test_a_set_replaced_by_another_run_while_it_was_read_is_not_moved_aside(tmp_path, monkeypatch):
    cache = SynthesisCache(tmp_path, "key")
    cache.save_complete(CalibrationSet(torch.zeros(2, 3, 4, 4), metadata={"run": 1}))
    fresh = CalibrationSet(torch.ones(2, 3, 4, 4), metadata={"run": 2})
    real, calls = SynthesisCache.load_complete, []

    def replaced_while_reading(self):  # the first read fails just as another run swaps in its rebuilt set
        calls.append(1)
        if len(calls) == 1:
            staging = tmp_path / "staging"
            save_calibration_set(fresh, staging)
            shutil.rmtree(self.complete_path)
            os.replace(staging, self.complete_path)
            raise ValueError("read half of the old set")
        return real(self)

    monkeypatch.setattr(SynthesisCache, "load_complete", replaced_while_reading)
    loaded = cache.load_complete_if_readable()
    assert len(calls) == 2 and torch.equal(loaded.pixel_values, fresh.pixel_values)
    assert not list(tmp_path.glob("key/*.damaged*"))  # the fresh set stays where it is


def test_a_set_saved_meanwhile_by_a_concurrent_run_is_kept(tmp_path, monkeypatch):
    first = CalibrationSet(torch.zeros(2, 3, 4, 4), metadata={"run": 1})
    second = CalibrationSet(torch.ones(2, 3, 4, 4), metadata={"run": 2})
    cache = SynthesisCache(tmp_path, "key")
    assert cache.save_complete(first)
    assert not cache.save_complete(second)  # already complete: kept
    answers = [True, False]  # the check before staging misses the set, as if the other run saved it just after
    monkeypatch.setattr(SynthesisCache, "is_complete", lambda self: self.complete_path.is_dir() and answers.pop())
    assert not cache.save_complete(second)  # the rename onto the saved set fails with ENOTEMPTY: the set is kept
    assert torch.equal(cache.load_complete().pixel_values, first.pixel_values)
    assert [p.name for p in (tmp_path / "key").iterdir()] == ["calibration_set"]  # no staging copy left behind


def _variant(model, **config_changes):
    config = copy.deepcopy(model.config)
    for name, value in config_changes.items():
        setattr(config, name, value)
    variant = type(model)(config).eval()
    variant.load_state_dict(model.state_dict())
    return variant


@pytest.mark.parametrize("change", [{"hidden_act": "relu"}, {"layer_norm_eps": 0.1}])
def test_same_weights_with_another_config_do_not_reuse_the_images(change, tmp_path, monkeypatch):
    model = tiny_vit()
    first = get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    calls = _count_optimisations(monkeypatch)
    other = get_synthesizer("psaq", **FAST).synthesize(_variant(model, **change), 2, seed=0, cache_dir=tmp_path,
                                                       **NORM)
    assert calls and other.metadata["cache_key"] != first.metadata["cache_key"]
    assert other.metadata["model"]["config"][next(iter(change))] == next(iter(change.values()))


def test_swin_with_another_image_size_does_not_reuse_the_images(tmp_path):
    small = tiny_swin()
    large = _variant(small, image_size=64)  # same parameter names and shapes, different input size
    get_synthesizer("psaq", **FAST).synthesize(small, 1, seed=0, cache_dir=tmp_path, **NORM)
    calib = get_synthesizer("psaq", **FAST).synthesize(large, 1, seed=0, cache_dir=tmp_path, **NORM)
    assert calib.pixel_values.shape == (1, 3, 64, 64)


def test_logging_explicit_defaults_and_the_folder_do_not_change_the_key(tmp_path, monkeypatch):
    model, swin = tiny_vit(), tiny_swin()
    first = get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    get_synthesizer("psaq", **FAST).synthesize(swin, 1, seed=0, cache_dir=tmp_path, **NORM)
    calls = _count_optimisations(monkeypatch)
    get_synthesizer("psaq", **dict(FAST, log_every=7)).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    get_synthesizer("psaq", **dict(FAST, checkpoint_every=1)).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    get_synthesizer("psaq", **dict(FAST, lr=0.2)).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    get_synthesizer("psaq", **dict(FAST, lr=0.25)).synthesize(swin, 1, seed=0, cache_dir=tmp_path, **NORM)
    get_synthesizer("psaq", **dict(FAST, jitter=(2, 4), iterations=[2, 2])).synthesize(model, 2, seed=0,
                                                                                      cache_dir=tmp_path, **NORM)
    copied = copy.deepcopy(model)
    copied.config._name_or_path = "/elsewhere/vit-copy"  # the same weights loaded from another folder
    again = get_synthesizer("psaq", **FAST).synthesize(copied, 2, seed=0, cache_dir=tmp_path, **NORM)
    assert calls == []
    assert again.metadata["cache_key"] == first.metadata["cache_key"]
    run_info = json.loads((tmp_path / first.metadata["cache_key"] / "run.json").read_text())
    assert "name_or_path" in run_info["model"]
    assert not {"log_every", "checkpoint_every"} & set(run_info["hyperparameters"])
    assert first.metadata["hyperparameters"]["lr"] == 0.2


def test_another_lr_still_changes_the_key(tmp_path, monkeypatch):
    model = tiny_vit()
    get_synthesizer("psaq", **FAST).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    calls = _count_optimisations(monkeypatch)
    get_synthesizer("psaq", **dict(FAST, lr=0.1)).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    assert calls


def test_batch_size_set_on_the_synthesizer_is_used_and_not_part_of_the_key(tmp_path, monkeypatch):
    calls = _count_optimisations(monkeypatch)
    model = tiny_vit()
    first = get_synthesizer("psaq", batch_size=2, **FAST).synthesize(model, 4, seed=0, cache_dir=tmp_path, **NORM)
    assert calls == [[0, 1], [2, 3]] and first.metadata["batch_size"] == 2
    again = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, cache_dir=tmp_path, **NORM)
    assert len(calls) == 2 and torch.equal(again.pixel_values, first.pixel_values)  # loaded, not recomputed
    explicit = get_synthesizer("psaq", batch_size=2, **FAST).synthesize(model, 4, seed=0, batch_size=4, **NORM)
    assert calls[-1] == [0, 1, 2, 3] and explicit.metadata["batch_size"] == 4  # the call's batch_size wins
    for bad in (0, 1.5, True):
        with pytest.raises(SynthesisError, match="batch_size must be a positive integer"):
            get_synthesizer("psaq", batch_size=bad)


def test_a_run_that_finishes_second_returns_the_set_of_the_first(tmp_path):
    model, finished_first = tiny_vit(), []

    def concurrent_run_finishes_meanwhile(record):
        if not finished_first:  # another process of the same key (other batch size) completes during this run
            finished_first.append(get_synthesizer("psaq", **FAST).synthesize(
                model, 4, seed=0, batch_size=4, cache_dir=tmp_path, **NORM))

    second = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path,
                                                         on_batch_end=concurrent_run_finishes_meanwhile, **NORM)
    (first,) = finished_first
    assert second.metadata["batch_size"] == first.metadata["batch_size"] == 4
    assert torch.equal(second.pixel_values, first.pixel_values)
    assert torch.equal(SynthesisCache(tmp_path, first.metadata["cache_key"]).load_complete().pixel_values,
                       second.pixel_values)


def test_another_image_count_or_normalisation_does_not_reuse_the_images(tmp_path, monkeypatch):
    model = tiny_vit()
    first = get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=0, cache_dir=tmp_path, **NORM)
    calls = _count_optimisations(monkeypatch)
    more = get_synthesizer("psaq", **FAST).synthesize(model, 5, seed=0, cache_dir=tmp_path, **NORM)
    assert len(more) == 5 and calls  # not the 3 cached images
    calls.clear()
    # another processor mean (same std): the images live in another normalised space, with another valid range
    mean = torch.tensor([0.1, 0.1, 0.1])
    shifted = get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=0, cache_dir=tmp_path,
                                                         image_mean=mean.tolist(), image_std=NORM["image_std"])
    assert calls and shifted.metadata["cache_key"] != first.metadata["cache_key"]
    std = torch.tensor(NORM["image_std"]).view(1, 3, 1, 1)
    raw = shifted.pixel_values * std + mean.view(1, 3, 1, 1)  # back to raw pixels: within [0, 1]
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    calls.clear()
    scaled = get_synthesizer("psaq", **FAST).synthesize(model, 3, seed=0, cache_dir=tmp_path,
                                                        image_mean=NORM["image_mean"], image_std=[0.5, 0.5, 0.5])
    assert calls and scaled.metadata["cache_key"] not in (first.metadata["cache_key"], shifted.metadata["cache_key"])


def _ctrl_c_at(monkeypatch, steps: int) -> list:
    """Ctrl-C once the run has done `steps` optimisation steps in all; returns, per batch optimised afterwards, its
    indices and the progress updates it made (a resumed batch first reports its saved steps at once)."""
    real, runs, done = pixel_synthesizer.optimize_batch, [], [0]

    class Progress:
        def __init__(self, updates):
            self.updates = updates

        def update(self, count):
            self.updates.append(count)
            done[0] += count
            if done[0] == steps:
                raise KeyboardInterrupt

    def with_progress(model, plan, *args, progress=None, **kwargs):
        runs.append((list(plan.indices), []))
        return real(model, plan, *args, progress=Progress(runs[-1][1]), **kwargs)

    monkeypatch.setattr(pixel_synthesizer, "optimize_batch", with_progress)
    return runs


@pytest.mark.parametrize("name", SYNTHESIZERS)
def test_ctrl_c_in_the_middle_of_a_batch_resumes_that_batch_from_its_step(name, tmp_path, monkeypatch, caplog):
    model = tiny_vit()
    settings = dict(FAST, iterations=(3, 3))  # 6 steps a batch
    reference = get_synthesizer(name, **settings).synthesize(model, 4, seed=0, batch_size=2, **NORM)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        _ctrl_c_at(patch, 6 + 4)  # the second batch at its step 4
        get_synthesizer(name, **settings).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in (run_dir / "partial").iterdir()] == ["00000002-00000004.safetensors"]
    assert "2 of 4 images are cached" in caplog.text and "images 2-3 at step 4" in caplog.text

    runs = _ctrl_c_at(monkeypatch, -1)
    with caplog.at_level("INFO", logger="optimum_dfq.synthesis.engine"):
        resumed = get_synthesizer(name, **settings).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path,
                                                               **NORM)
    assert "images 2-3: resuming from their checkpoint at step 4" in caplog.text
    assert runs == [([2, 3], [4, 1, 1])]  # steps 0-3 of the batch are not run again
    assert torch.equal(resumed.pixel_values, reference.pixel_values)
    assert resumed.metadata["loss_history"] == reference.metadata["loss_history"]
    assert list((run_dir / "partial").iterdir()) == []  # a finished batch's checkpoint goes


def test_a_killed_run_resumes_each_batch_from_its_last_periodic_checkpoint(tmp_path, monkeypatch):
    model = tiny_vit()
    settings = dict(FAST, iterations=(3, 3), checkpoint_every=2)
    reference = get_synthesizer("psaq", **settings).synthesize(model, 2, seed=0, **NORM)
    real = pixel_synthesizer.optimize_batch

    class Killed(BaseException):  # what the process sees of SIGKILL: nothing, so nothing may be saved at that point
        pass

    class DiesAtStep5:
        done = 0

        def update(self, count):
            self.done += count
            if self.done == 5:
                raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(pixel_synthesizer, "optimize_batch",
                      lambda *args, progress=None, **kwargs: real(*args, progress=DiesAtStep5(), **kwargs))
        get_synthesizer("psaq", **settings).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    runs = _ctrl_c_at(monkeypatch, -1)
    resumed = get_synthesizer("psaq", **settings).synthesize(model, 2, seed=0, cache_dir=tmp_path, **NORM)
    assert runs == [([0, 1], [4, 1, 1])]  # from the checkpoint at step 4
    assert torch.equal(resumed.pixel_values, reference.pixel_values)


@pytest.mark.parametrize("damage", ["truncate", "another_batch", "another_format"])
def test_a_damaged_batch_checkpoint_is_moved_aside_and_the_batch_starts_again(damage, tmp_path, monkeypatch,
                                                                               caplog):
    model = tiny_vit()
    reference = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, **NORM)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _ctrl_c_at(patch, 4 + 2)
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    checkpoint = run_dir / "partial" / "00000002-00000004.safetensors"
    if damage == "truncate":
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    elif damage == "another_format":  # e.g. written by a later version, whose state this one cannot tell apart
        with safe_open(str(checkpoint), framework="pt") as handle:
            header = dict(handle.metadata(), format="optimum_dfq.batch_checkpoint/999")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        save_file(tensors, str(checkpoint), metadata=header)
    else:  # a readable checkpoint of another batch size: 1 image where the batch has 2
        cache = SynthesisCache(tmp_path, run_dir.name)
        state = cache.batch_checkpoint(2, 4, None).load()
        state.images, state.augment = state.images[:1], state.augment[:1]
        cache.batch_checkpoint(2, 4, None).save(state)
    damaged_bytes = checkpoint.read_bytes()
    runs = _ctrl_c_at(monkeypatch, -1)
    with caplog.at_level("WARNING", logger="optimum_dfq.synthesis.cache"):
        resumed = get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path,
                                                             **NORM)
    assert runs == [([2, 3], [1, 1, 1, 1])]  # from step 0
    assert torch.equal(resumed.pixel_values, reference.pixel_values)
    assert (run_dir / "partial" / "00000002-00000004.safetensors.damaged").read_bytes() == damaged_bytes
    assert str(checkpoint) in caplog.text and "starts again from step 0" in caplog.text


def test_a_checkpoint_left_beside_its_finished_batch_is_removed(tmp_path, monkeypatch):
    model = tiny_vit()
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _ctrl_c_at(patch, 2)
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    leftover = run_dir / "partial" / "00000000-00000002.safetensors"
    saved = leftover.read_bytes()
    get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    shutil.rmtree(run_dir / "calibration_set")  # as if the run crashed after its shard was written
    (run_dir / "shards" / "00000002-00000004.safetensors").unlink()
    leftover.write_bytes(saved)
    seen = []  # whether the leftover is still there once the resumed run has finished its first batch
    get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path,
                                               on_batch_end=lambda record: seen.append(leftover.exists()), **NORM)
    # gone when the run starts, not only once the set is saved: an interruption meanwhile would list the finished
    # batch among those "being optimised" (and it would take the space of three batches of pixels)
    assert seen == [False]
    assert not leftover.exists()


def test_a_finished_batch_leaves_no_checkpoint_behind(tmp_path):
    # else an interruption later in the run would list it among the batches "being optimised", and every finished
    # batch would hold three times its pixels on disk until the set is saved
    left = []
    get_synthesizer("psaq", **FAST, checkpoint_every=1).synthesize(
        tiny_vit(), 4, seed=0, batch_size=2, cache_dir=tmp_path,
        on_batch_end=lambda record: left.append(sorted(path.name for path in tmp_path.rglob("partial/*"))), **NORM)
    assert left == [[], []]


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True])
def test_checkpoint_every_must_be_a_step_count(bad):
    with pytest.raises(SynthesisError, match="checkpoint_every"):
        get_synthesizer("psaq", checkpoint_every=bad)


def test_a_resumed_run_reads_each_cached_batch_once(tmp_path, monkeypatch):
    from optimum_dfq.synthesis import cache as cache_module

    model = tiny_vit()
    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path,
                                                   on_batch_end=_interrupt_after_first_batch, **NORM)
    reads, load_file = [], cache_module.load_file
    monkeypatch.setattr(cache_module, "load_file", lambda path: reads.append(os.path.basename(path)) or load_file(path))
    get_synthesizer("psaq", **FAST).synthesize(model, 6, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    assert reads == ["00000000-00000002.safetensors"]  # checked once when the run starts, not read again at the end


def test_checkpoints_of_another_batch_grid_are_removed_once_the_set_is_saved(tmp_path, monkeypatch):
    model = tiny_vit()
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _ctrl_c_at(patch, 4 + 2)  # batch_size=2: images 2-3 checkpointed at step 2
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    (run_dir,) = tmp_path.iterdir()
    (run_dir / "partial" / "00000000-00000002.safetensors.damaged").write_bytes(b"kept for inspection")
    get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=4, cache_dir=tmp_path, **NORM)
    assert [path.name for path in (run_dir / "partial").iterdir()] == ["00000000-00000002.safetensors.damaged"]


def test_the_ctrl_c_warning_of_a_multi_process_run_does_not_say_the_other_processes_batches_start_again(tmp_path,
                                                                                                       caplog):
    # the main process warns as soon as its own checkpoint is saved: the other processes may still be saving theirs
    from types import SimpleNamespace

    state = SimpleNamespace(is_main_process=True, num_processes=2, process_index=0)
    with caplog.at_level("WARNING"):
        pixel_synthesizer._warn_interrupted(state, SynthesisCache(tmp_path, "key"), [(0, 2), (2, 4)])
    assert "0 of 4 images are cached" in caplog.text
    assert "start again" not in caplog.text and "other processes" in caplog.text


def test_a_checkpoint_replaced_by_another_run_while_it_is_read_gives_one_consistent_state(tmp_path, monkeypatch):
    """Two runs of the same key checkpoint the same batch: a load must not take the pixels of one save and the step
    of the next (the resumed images would silently differ from an uninterrupted run's)."""
    from optimum_dfq.synthesis import cache as cache_module
    from optimum_dfq.synthesis.engine import EngineState

    def state(step):
        return EngineState(step, torch.full((2, 3, 4, 4), float(step)), {"exp_avg": torch.full((2, 3, 4, 4), 1.0)},
                           torch.zeros(2, 8, dtype=torch.uint8), {"total": [0.0] * step}, {})

    checkpoint = SynthesisCache(tmp_path, "key").batch_checkpoint(0, 2, 100)
    checkpoint.save(state(100))
    newer = SynthesisCache(tmp_path, "other").batch_checkpoint(0, 2, 100)
    newer.save(state(200))
    read = cache_module.safe_open

    def replaced_meanwhile(*args, **kwargs):  # the other run renames its newer save into place while this one reads
        if newer.path.exists():
            os.replace(newer.path, checkpoint.path)
        return read(*args, **kwargs)

    monkeypatch.setattr(cache_module, "safe_open", replaced_meanwhile)
    loaded = checkpoint.load()
    assert loaded is not None and len(loaded.history["total"]) == loaded.step
    assert torch.equal(loaded.images, torch.full((2, 3, 4, 4), float(loaded.step)))


def test_a_checkpoint_removed_by_another_run_while_it_is_opened_is_no_checkpoint(tmp_path, monkeypatch):
    """Another run of the same key finishes the batch and removes its checkpoint between this run's check that the
    file exists and its read: the batch starts again, the synthesis does not fail with FileNotFoundError."""
    from optimum_dfq.synthesis import cache as cache_module
    from optimum_dfq.synthesis.engine import EngineState

    checkpoint = SynthesisCache(tmp_path, "key").batch_checkpoint(0, 2, 100)
    checkpoint.save(EngineState(3, torch.zeros(2, 3, 4, 4), {"exp_avg": torch.zeros(2, 3, 4, 4)},
                                torch.zeros(2, 8, dtype=torch.uint8), {"total": [0.0] * 3}, {}))
    read = cache_module.safe_open

    def removed_meanwhile(*args, **kwargs):
        checkpoint.discard()  # the other run wrote the batch's shard
        return read(*args, **kwargs)

    monkeypatch.setattr(cache_module, "safe_open", removed_meanwhile)
    assert checkpoint.load() is None
    assert not list(checkpoint.path.parent.iterdir())  # nothing moved aside



def _left_by_killed_writer(folder, kind="file", name="00000002-00000004") -> str:
    """A temporary made by a process that dies before renaming it (as SIGKILL mid-write leaves it), named as
    `cache._temporary_prefix` names it in that process."""
    writer = ("import os, sys, tempfile\n"
              "prefix = f'.{sys.argv[3]}.tmp-{sys.argv[4]}-{os.getpid()}-'\n"
              "make = tempfile.mkdtemp if sys.argv[2] == 'dir' else tempfile.mkstemp\n"
              "made = make(prefix=prefix, dir=sys.argv[1])\n"
              "print(made if sys.argv[2] == 'dir' else made[1]); os._exit(9)")
    out = subprocess.run([sys.executable, "-c", writer, str(folder), kind, name, cache_module._host_tag()],
                         capture_output=True, text=True, check=False)
    path = out.stdout.strip()
    assert out.returncode == 9 and os.path.exists(path), out.stderr
    return path


def _aged(path, seconds=cache_module.ABANDONED_TEMPORARY_AGE_S + 60):
    then = os.path.getmtime(path) - seconds
    os.utime(path, (then, then))
    return str(path)


def test_temporaries_of_killed_writers_are_removed_when_a_run_of_the_key_starts(tmp_path):
    model = tiny_vit()
    with pytest.raises(_Interrupt):
        get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM,
                                                   on_batch_end=lambda record: (_ for _ in ()).throw(_Interrupt()))
    (run_dir,) = tmp_path.iterdir()
    (run_dir / "partial").mkdir(exist_ok=True)
    abandoned = [_aged(_left_by_killed_writer(run_dir / "shards")), _aged(_left_by_killed_writer(run_dir / "partial")),
                 _aged(_left_by_killed_writer(run_dir, "dir", "calibration_set"))]
    recent = _left_by_killed_writer(run_dir / "partial")  # its writer may have died just now on a slow disk
    _, live = cache_module.tempfile.mkstemp(prefix=cache_module._temporary_prefix("00000000-00000002"),
                                            dir=run_dir / "partial")  # this process: alive
    assert os.path.basename(live).startswith(f".00000000-00000002.tmp-{cache_module._host_tag()}-{os.getpid()}-")
    other_host = run_dir / "shards" / os.path.basename(abandoned[0]).replace(
        f".tmp-{cache_module._host_tag()}-", ".tmp-0badc0de-")  # a host sharing the folder: its pids are not ours
    shutil.copy(abandoned[0], other_host)
    kept = [recent, _aged(live), _aged(other_host)]
    get_synthesizer("psaq", **FAST).synthesize(model, 4, seed=0, batch_size=2, cache_dir=tmp_path, **NORM)
    assert [os.path.exists(path) for path in abandoned] == [False, False, False]
    assert [os.path.exists(path) for path in kept] == [True, True, True]


def test_a_temporary_that_cannot_be_removed_is_left_with_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    # a cache folder shared by several users of a group: another user's dead writer left a folder this one may not
    # empty (mkdtemp makes it 0700); the clean-up is best effort and must not stop the synthesis that runs it
    cache = SynthesisCache(tmp_path, "key")
    cache.shards.mkdir(parents=True)
    folder = _aged(_left_by_killed_writer(cache.directory, "dir", "calibration_set"))
    file = _aged(_left_by_killed_writer(cache.shards))

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(cache_module.shutil, "rmtree", refused)
    monkeypatch.setattr(cache_module.os, "remove", refused)
    with caplog.at_level("WARNING", logger=cache_module.logger.name):
        assert cache.remove_abandoned_temporaries() == []
    assert os.path.exists(folder) and os.path.exists(file)
    assert "Permission denied" in caplog.text and os.path.basename(folder) in caplog.text
