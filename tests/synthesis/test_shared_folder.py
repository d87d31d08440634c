"""The probe of a shared cache folder, one process at a time: the collective calls are faked, the filesystem is real.

The same probe between two real processes: tests/synthesis/test_distributed.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from optimum_dfq.synthesis import shared_folder
from optimum_dfq.synthesis.shared_folder import PROBE_NAME_RE, PROBE_PREFIX, processes_not_sharing

TOKEN = "0123456789abcdef0123456789abcdef"


def _state(rank: int) -> SimpleNamespace:
    return SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)


def _collectives(monkeypatch, broadcasts: list, on_gather=lambda items: list(items)) -> list:
    """Fakes the collective calls: each broadcast answers the main process's value (the next of `broadcasts` on other
    processes), the gather answers `on_gather(items)`; returns what this process gathered."""
    answers, gathered = iter(broadcasts), []

    def broadcast(state, value):
        return value if state.is_main_process else next(answers)

    def gather(state, items):
        gathered.extend(items)
        return on_gather(items)

    monkeypatch.setattr(shared_folder, "broadcast_from_main", broadcast)
    monkeypatch.setattr(shared_folder, "gather_lists", gather)
    return gathered


def _broken_gather(items):
    raise RuntimeError("the process group broke down")


def test_a_single_process_writes_nothing(tmp_path):
    assert processes_not_sharing(SimpleNamespace(num_processes=1), tmp_path / "cache") == {}
    assert not (tmp_path / "cache").exists()


def test_the_main_process_probes_the_folder_and_removes_its_probe(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "cache"  # made by the main process, as the run would make it
    seen = []

    def other_process_answers(items):  # process 1 finds the main probe and writes its own beside it
        (main_probe,) = folder.iterdir()
        token = main_probe.name[len(PROBE_PREFIX):]
        assert PROBE_NAME_RE.match(main_probe.name) and main_probe.read_text() == token
        (folder / f"{main_probe.name}-1").write_text(token)
        seen.append(main_probe)
        return list(items) + [None]

    _collectives(monkeypatch, [], other_process_answers)
    assert processes_not_sharing(_state(0), folder) == {}
    assert list(folder.iterdir()) == [folder / f"{seen[0].name}-1"]  # the main probe is gone; process 1 removes its own

    _collectives(monkeypatch, [], other_process_answers)  # another check: another name (a concurrent run's differs too)
    (folder / f"{seen[0].name}-1").unlink()
    processes_not_sharing(_state(0), folder)
    assert seen[1] != seen[0]


def test_the_main_process_reports_what_the_others_do_not_see_and_what_it_does_not_see_of_theirs(tmp_path,
                                                                                                monkeypatch):
    _collectives(monkeypatch, [], lambda items: list(items) + [None])  # process 1 says it saw, yet wrote nothing here
    assert processes_not_sharing(_state(0), tmp_path) == {
        1: "wrote a probe file there that the main process does not see"}
    _collectives(monkeypatch, [], lambda items: list(items) + ["sees no probe file that the main process wrote there"])
    assert processes_not_sharing(_state(0), tmp_path) == {1: "sees no probe file that the main process wrote there"}
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []  # a folder it did not make stays


def test_the_main_probe_is_removed_when_a_collective_call_fails(tmp_path, monkeypatch):
    _collectives(monkeypatch, [], _broken_gather)
    with pytest.raises(RuntimeError, match="broke down"):
        processes_not_sharing(_state(0), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_folders_the_main_process_made_are_removed_unless_every_process_shares_them(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "cache"
    not_seen = "sees no probe file that the main process wrote there"
    _collectives(monkeypatch, [], lambda items: list(items) + [not_seen])
    assert processes_not_sharing(_state(0), folder) == {1: not_seen}
    assert list(tmp_path.iterdir()) == []  # both folders it made are gone; the one that was there stays

    _collectives(monkeypatch, [], _broken_gather)
    with pytest.raises(RuntimeError, match="broke down"):
        processes_not_sharing(_state(0), folder)
    assert list(tmp_path.iterdir()) == []

    def another_run_writes_there(items):  # a folder something else has put a file in is not removed
        (folder.parent / "other-run").write_text("")
        return list(items) + [not_seen]

    _collectives(monkeypatch, [], another_run_writes_there)
    processes_not_sharing(_state(0), folder)
    assert list(tmp_path.iterdir()) == [tmp_path / "new"] and list((tmp_path / "new").iterdir()) == [
        tmp_path / "new" / "other-run"]


def test_a_main_process_that_cannot_write_the_probe_says_so_to_every_process(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    gathered = _collectives(monkeypatch, [])
    unshared = processes_not_sharing(_state(0), tmp_path / "file" / "cache")  # no folder can be made in a file
    assert list(unshared) == [0] and unshared[0].startswith("cannot write there (")
    assert gathered == []  # every process returns on the broadcast: no one waits in the gather

    gathered = _collectives(monkeypatch, [(TOKEN, unshared[0])])
    assert processes_not_sharing(_state(1), tmp_path / "cache") == unshared
    assert gathered == [] and not (tmp_path / "cache").exists()


def test_another_process_that_sees_the_main_probe_answers_with_its_own_and_removes_it(tmp_path, monkeypatch):
    (tmp_path / f"{PROBE_PREFIX}{TOKEN}").write_text(TOKEN)  # written by the main process
    own = tmp_path / f"{PROBE_PREFIX}{TOKEN}-1"

    def main_looks(items):  # the main process looks for process 1's probe before the last broadcast
        assert own.read_text() == TOKEN
        return [None, *items]

    gathered = _collectives(monkeypatch, [(TOKEN, None), {}], main_looks)
    assert processes_not_sharing(_state(1), tmp_path) == {}
    assert gathered == [None] and not own.exists()


def test_another_process_that_does_not_see_the_main_probe_says_so_and_writes_nothing(tmp_path, monkeypatch):
    verdict = {1: "sees no probe file that the main process wrote there"}
    gathered = _collectives(monkeypatch, [(TOKEN, None), verdict], lambda items: [None, *items])
    assert processes_not_sharing(_state(1), tmp_path / "local") == verdict
    assert gathered == [verdict[1]] and not (tmp_path / "local").exists()


def test_another_process_that_cannot_write_beside_the_main_probe_says_so(tmp_path, monkeypatch):
    (tmp_path / f"{PROBE_PREFIX}{TOKEN}").write_text(TOKEN)
    (tmp_path / f"{PROBE_PREFIX}{TOKEN}-1").mkdir()  # in the way of its probe file, as a read-only mount would be
    gathered = _collectives(monkeypatch, [(TOKEN, None), {}], lambda items: [None, *items])
    processes_not_sharing(_state(1), tmp_path)
    assert gathered[0].startswith("cannot write there (FileExistsError")
    assert (tmp_path / f"{PROBE_PREFIX}{TOKEN}-1").is_dir()  # what it did not write, it does not remove


def test_a_folder_the_main_process_made_stays_when_every_process_shares_it(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "cache"  # the run keeps its cache there
    calls = []

    def other_process_answers(items):
        (main_probe,) = folder.iterdir()
        (folder / f"{main_probe.name}-1").write_text(main_probe.read_text())
        return list(items) + [None]

    def broadcast(state, value):  # process 1 removes its probe once the main process has looked for it
        calls.append(value)
        if len(calls) == 2:
            for probe in folder.glob(f"{PROBE_PREFIX}*-1"):
                probe.unlink()
        return value

    _collectives(monkeypatch, [], other_process_answers)
    monkeypatch.setattr(shared_folder, "broadcast_from_main", broadcast)
    assert processes_not_sharing(_state(0), folder) == {}
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.parametrize("answer", ["another token", "a folder"])
def test_the_main_process_takes_only_the_token_it_wrote_for_a_probe_seen(answer, tmp_path, monkeypatch):
    def other_process_answers(items):  # something is there under process 1's probe name, but not its token
        (main_probe,) = tmp_path.iterdir()
        theirs = tmp_path / f"{main_probe.name}-1"
        theirs.mkdir() if answer == "a folder" else theirs.write_text("f" * 32)
        return list(items) + [None]

    _collectives(monkeypatch, [], other_process_answers)
    assert processes_not_sharing(_state(0), tmp_path) == {
        1: "wrote a probe file there that the main process does not see"}


def test_a_folder_given_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []

    def other_process_answers(items):
        seen.extend(path.name for path in (tmp_path / "cache").iterdir())
        return list(items) + ["sees no probe file that the main process wrote there"]

    _collectives(monkeypatch, [], other_process_answers)
    processes_not_sharing(_state(0), "~/cache")
    assert len(seen) == 1 and seen[0].startswith(PROBE_PREFIX)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "~").exists()


def test_a_probe_that_cannot_be_written_whole_is_removed(tmp_path, monkeypatch):
    real_open = open

    class FullDisk:  # the file is made, then writing to it fails
        def __init__(self, *args):
            self.file = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_folder, "open", FullDisk, raising=False)
    gathered = _collectives(monkeypatch, [])
    unshared = processes_not_sharing(_state(0), tmp_path)
    assert list(unshared) == [0] and "No space left on device" in unshared[0] and gathered == []
    assert list(tmp_path.iterdir()) == []
