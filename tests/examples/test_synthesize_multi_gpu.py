"""`examples/synthesize_multi_gpu.py` on one CPU process at tiny settings: the set it saves, an earlier set kept."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from optimum_dfq.synthesis import load_calibration_set

ROOT = Path(__file__).resolve().parents[2]


def _run(output: Path, model: str = "vit-cifar10", num_images: int = 2) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, str(ROOT / "examples" / "synthesize_multi_gpu.py"), "--model",
               str(ROOT / "examples" / "models" / model), "--synthesizer", "psaq", "--num-images", str(num_images),
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


def test_a_float16_checkpoint_is_synthesized_in_float32(tmp_path):
    # the reference models are stored in float16, which transformers 5 loads as float16 by default: Swin's patch
    # embedding then refused the float32 pixels, and ViT/DeiT were optimised through a float16 model on the CPU
    from optimum_dfq import DataFreeViTQuantizer
    from optimum_dfq.synthesis import get_synthesizer

    result = _run(tmp_path / "calib", model="swin-cifar10", num_images=1)
    assert result.returncode == 0, result.stderr[-3000:]
    quantizer = DataFreeViTQuantizer.from_pretrained(ROOT / "examples" / "models" / "swin-cifar10")  # float32
    expected = get_synthesizer("psaq", iterations=[1, 1], warmup=1).synthesize(
        quantizer.model, 1, seed=0, image_processor=quantizer.image_processor)
    assert torch.equal(load_calibration_set(tmp_path / "calib").pixel_values, expected.pixel_values)
