"""Two CPU processes under torchrun give the images of one process."""

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
NUM_IMAGES = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path.cwd()))
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(WORKER), "--out", str(tmp_path),
               "--num-images", str(NUM_IMAGES)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for name, family in CASES.items():
        assert ranks[0][name]["num_processes"] == 2 and ranks[1][name]["num_processes"] == 2
        assert ranks[0][name]["batches"] == [[0, 3]] and ranks[1][name]["batches"] == [[3, 5]]
        gathered = load_file(str(tmp_path / f"{name}.safetensors"))
        reference = get_synthesizer(name, **FAST).synthesize(BUILDERS[family](), NUM_IMAGES, seed=0, **NORM)
        assert gathered["pixel_values"].shape == reference.pixel_values.shape
        assert torch.allclose(gathered["pixel_values"], reference.pixel_values, atol=1e-4), name
        assert torch.equal(gathered["labels"], reference.labels)
