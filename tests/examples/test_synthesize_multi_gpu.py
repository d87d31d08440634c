"""`examples/synthesize_multi_gpu.py` on one CPU process at tiny settings: the set it saves, an earlier set kept."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from optimum_dfq.synthesis import load_calibration_set

ROOT = Path(__file__).resolve().parents[2]


def _run(output: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, str(ROOT / "examples" / "synthesize_multi_gpu.py"), "--model",
               str(ROOT / "examples" / "models" / "vit-cifar10"), "--synthesizer", "psaq", "--num-images", "2",
               "--hyperparameters", '{"iterations": [1, 1], "warmup": 1}', "--output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=600)


def test_saves_the_set_and_refuses_to_replace_it(tmp_path):
    first = _run(tmp_path / "calib")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 images from 1 process(es) saved to" in first.stdout
    saved = load_calibration_set(tmp_path / "calib")
    assert len(saved) == 2 and saved.metadata["synthesizer"] == "psaq"

    again = _run(tmp_path / "calib")
    assert again.returncode == 2 and "is not an empty folder" in again.stderr
    assert torch.equal(load_calibration_set(tmp_path / "calib").pixel_values, saved.pixel_values)
