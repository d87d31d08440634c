"""The README's main job (`examples/quantize_reference_model.py`), at tiny settings: its printed lines and JSON."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_main_job_prints_the_readme_lines(tmp_path):
    env = _env()
    data = FIXTURES / "cifar10_tiny_test.parquet"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quantize_reference_model.py"), "--bits", "w8a8",
         "--synthesizer", "gaussian", "--num-images", "2", "--eval-data", str(data), "--output",
         str(tmp_path / "rows.json")],
        capture_output=True, text=True, check=False, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"model: .*vit-cifar10 \(ViTForImageClassification, 1,205,898 parameters\)", lines[0])
    assert lines[1] == f"evaluation: 256 labelled images from {data} (never used for calibration)"  # not the default
    assert re.fullmatch(r" float32  top-1 +\d+\.\d\d%", lines[2])
    quantized = r"    w8a8  top-1 +\d+\.\d\d%   \(data-free: 2 images from 'gaussian', quantized in \d+\.\d s\)"
    assert re.fullmatch(quantized, lines[3])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["model"] for row in rows] == ["float32", "w8a8"] and rows[1]["num_images"] == 2


def test_an_unknown_preset_is_refused_before_anything_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quantize_reference_model.py"), "--bits", "w8a8", "w4x4"],
        capture_output=True, text=True, check=False, env=_env(), timeout=600,
    )
    assert result.returncode == 2 and "Unknown bit preset 'w4x4'" in result.stderr
    assert result.stdout == ""  # no float evaluation, no synthesis


def test_output_in_a_new_folder_is_written_and_a_folder_is_refused_first(tmp_path):
    # the JSON used to be written only after every preset, into a folder that had to exist: minutes of synthesis lost
    args = [sys.executable, str(ROOT / "examples" / "quantize_reference_model.py"), "--bits", "w8a8", "--synthesizer",
            "gaussian", "--num-images", "2", "--eval-data", str(FIXTURES / "cifar10_tiny_test.parquet")]
    output = tmp_path / "results" / "rows.json"
    result = subprocess.run(args + ["--output", str(output)], capture_output=True, text=True, check=False,
                            env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["model"] for row in json.loads(output.read_text())] == ["float32", "w8a8"]

    result = subprocess.run(args + ["--output", str(tmp_path)], capture_output=True, text=True, check=False,
                            env=_env(), timeout=600)
    assert result.returncode == 2 and f"--output {tmp_path} is a folder" in result.stderr
    assert result.stdout == ""  # refused before the float evaluation


def test_an_unknown_synthesizer_or_no_images_is_refused_before_anything_runs():
    # both failed with a traceback after the float evaluation
    script = str(ROOT / "examples" / "quantize_reference_model.py")
    for argv, message in [(["--synthesizer", "psaqq"], "Unknown synthesizer 'psaqq'"),
                          (["--num-images", "0"], "--num-images 0 must be at least 1")]:
        result = subprocess.run([sys.executable, script, "--bits", "w8a8", *argv], capture_output=True, text=True,
                                check=False, env=_env(), timeout=600)
        assert result.returncode == 2 and message in result.stderr
        assert result.stdout == ""
