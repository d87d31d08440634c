"""Two CPU processes under torchrun give bit-identical images to one process, interrupted and resumed or not."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_worker import CASES
from safetensors.torch import load_file
from synth_helpers import BUILDERS, FAST, NORM, one_thread  # noqa: F401

from optimum_dfq.synthesis import get_synthesizer

WORKER = Path(__file__).with_name("_dist_worker.py")
#: On 2 processes the default batch size is ceil(34 / 2) = 17: grid 0-17, 17-34, a batch for each process.
NUM_IMAGES = 34

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out: Path, *worker_args: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the worker on 2 processes; `env` adds to (a value `""`: removes from) the environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path.cwd()), **(env or {}))
    env = {name: value for name, value in env.items() if value != "" and name != "WORLD_SIZE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(WORKER), "--out", str(out), *worker_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=timeout)


def _reference(name: str, num_images: int, batch_size: int | None = None):
    return get_synthesizer(name, **FAST).synthesize(BUILDERS[CASES[name]](), num_images, seed=0,
                                                    batch_size=batch_size, **NORM)


def test_two_processes_share_the_default_grid_and_match_one_process_with_its_batch_size(tmp_path):
    result = _torchrun(tmp_path, "--num-images", str(NUM_IMAGES))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for name in CASES:
        assert ranks[0][name]["num_processes"] == 2 and ranks[1][name]["num_processes"] == 2
        # The default batch size gives every process a batch; one process with that batch size makes the same images.
        assert ranks[0][name]["batches"] == [[0, 17]] and ranks[1][name]["batches"] == [[17, 34]]
        gathered = load_file(str(tmp_path / f"{name}.safetensors"))
        reference = _reference(name, NUM_IMAGES, batch_size=17)
        assert torch.equal(gathered["pixel_values"], reference.pixel_values), name
        assert torch.equal(gathered["labels"], reference.labels), name


def test_interrupted_two_process_run_resumes_to_the_one_process_images(tmp_path):
    num_images, cache = 70, tmp_path / "cache"  # grid 0-32, 32-64, 64-70 (batch min(32, 35)): rank 0 gets two batches
    interrupted = _torchrun(tmp_path, "--num-images", str(num_images), "--names", "psaq", "--cache-dir", str(cache),
                            "--interrupt")
    assert interrupted.returncode != 0 and "simulated interruption" in interrupted.stderr + interrupted.stdout
    (run_dir,) = cache.iterdir()
    assert not (run_dir / "calibration_set").exists()
    assert "00000000-00000032.safetensors" in {p.name for p in (run_dir / "shards").iterdir()}
    damaged = run_dir / "shards" / "00000064-00000070.safetensors"
    damaged.write_bytes(b"")  # as a crash can leave it: checked and moved aside by rank 0 alone, then synthesized

    resumed = _torchrun(tmp_path, "--num-images", str(num_images), "--names", "psaq", "--cache-dir", str(cache),
                        "--repeat")
    logs = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, logs[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text())["psaq"] for rank in (0, 1)]
    ran = [batch for report in reports for batch in report["batches"]]
    assert [32, 64] in ran and [64, 70] in ran and [0, 32] not in ran and len(ran) == 2
    assert logs.count("Resuming:") == 1 and logs.count("Loading the cached calibration set") == 1, logs[-3000:]
    assert logs.count("cannot be read back") == 1 and damaged.with_name(damaged.name + ".damaged").exists()

    reference = _reference("psaq", num_images)
    gathered = load_file(str(tmp_path / "psaq.safetensors"))
    assert torch.equal(gathered["pixel_values"], reference.pixel_values)
    assert torch.equal(gathered["labels"], reference.labels)


def test_one_process_run_resumed_on_two_processes_keeps_its_batch_grid(tmp_path):
    # the default batch size of 34 images is 32 on one process and 17 on two: the resumed run must take the cached
    # grid (0-32, 32-34) rather than discard the finished batch
    cache = tmp_path / "cache"

    def interrupt(record):
        raise RuntimeError("simulated interruption")

    with pytest.raises(RuntimeError, match="simulated interruption"):
        get_synthesizer("psaq", **FAST).synthesize(BUILDERS[CASES["psaq"]](), NUM_IMAGES, seed=0, cache_dir=cache,
                                                   on_batch_end=interrupt, **NORM)
    resumed = _torchrun(tmp_path, "--num-images", str(NUM_IMAGES), "--names", "psaq", "--cache-dir", str(cache))
    logs = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, logs[-3000:]
    assert "batch_size=32 instead of the default 17" in logs and "Resuming: 32 of 34 images" in logs, logs[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text())["psaq"] for rank in (0, 1)]
    ran = [batch for report in reports for batch in report["batches"]]
    assert ran == [[32, 34]]
    gathered = load_file(str(tmp_path / "psaq.safetensors"))
    assert torch.equal(gathered["pixel_values"], _reference("psaq", NUM_IMAGES).pixel_values)


def _probes(*folders: Path) -> list[Path]:
    return [path for folder in folders if folder.is_dir() for path in folder.iterdir()
            if path.name.startswith(".optimum_dfq-probe-")]


def test_a_cache_every_process_sees_is_used_whatever_the_machines_and_the_probe_is_removed(tmp_path):
    # processes on two "machines" (their host names differ) sharing one filesystem, as an NFS home: the default cache
    # and an explicit one are both used, the second synthesis of each loading the finished set on both processes
    home, explicit = tmp_path / "home-cache", tmp_path / "explicit"
    result = _torchrun(tmp_path, "--num-images", "4", "--names", "psaq", "--rank-hostnames", "--repeat",
                       "--cache-dir", "default", "--cache-dir", str(explicit),
                       env={"OPTIMUM_DFQ_CACHE": str(home), "OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE": ""}, timeout=120)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-3000:]
    assert "not shared" not in logs and logs.count("Loading the cached calibration set") == 2, logs[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text())["psaq"] for rank in (0, 1)]
    # each process synthesized its batch once per cache folder, then the finished set was loaded instead
    assert reports[0]["batches"] == [[0, 2]] * 2 and reports[1]["batches"] == [[2, 4]] * 2
    for root in (home / "synthesis", explicit):
        (run_dir,) = root.iterdir()  # the run, and no probe left
        assert sorted(path.name for path in (run_dir / "shards").iterdir()) == [
            "00000000-00000002.safetensors", "00000002-00000004.safetensors"]  # each process's batch, in one folder


def test_a_cache_folder_that_is_another_folder_on_each_process_is_not_used(tmp_path):
    # each process works in its own folder, so the same relative paths name another folder on each, as node-local
    # storage mounted under the same path on each machine (or a container's own disk) does; the host name is the same
    result = _torchrun(tmp_path, "--num-images", "4", "--names", "psaq", "--rank-cwd", "--record-errors",
                       "--cache-dir", "default", "--cache-dir", "scratch",
                       env={"OPTIMUM_DFQ_CACHE": "home-cache", "OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE": ""}, timeout=120)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-3000:]  # no process left waiting for another

    # the default cache: a warning, and the run goes on without a cache
    assert logs.count("The default synthesis cache (home-cache/synthesis on the main process) is not shared by every "
                      "process of this run (process 1 sees no probe file that the main process wrote there)") == 1
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text())["psaq"] for rank in (0, 1)]
    assert reports[0]["batches"] == [[0, 2]] and reports[1]["batches"] == [[2, 4]]  # the explicit run made none
    assert not (tmp_path / "rank0" / "home-cache").exists()  # made for the probe, then removed
    assert not (tmp_path / "rank1" / "home-cache").exists()

    # the explicit cache_dir: a ConfigError on every process, naming the folder, the process and the fix
    for report in reports:
        (error,) = report["errors"]
        assert error.startswith("The synthesis cache folder scratch (cache_dir=) is not shared by every process of "
                                "this run: process 1 sees no probe file that the main process wrote there."), error
        assert "cache_dir=False (--no-cache)" in error
    assert not (tmp_path / "rank1" / "scratch").exists()  # process 1 wrote nothing where it saw no probe
    assert not (tmp_path / "rank0" / "scratch").exists()  # nor is the folder the main process made for its probe left
