"""The benchmark scripts run end to end on tiny models and the CIFAR-10 fixture.

They are commands, not library code, so nothing else imports them: these runs are what notices when a change to the
library or to a shared helper breaks one of them. Each run is checked against the same figure computed here.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_dfq.evaluation import evaluate_accuracy

from ..conftest import FIXTURES, tiny_swin, tiny_vit

ROOT = Path(__file__).resolve().parents[2]
EVAL_IMAGES = 16
QUICK = ["--synth-iterations", "2", "--eval-limit", str(EVAL_IMAGES), "--threads", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A datasets folder laid out like `../shared/data/cifar10`: 64 train and 256 test images."""
    folder = tmp_path_factory.mktemp("cifar10_tiny")
    (folder / "data").mkdir()
    for split in ("train", "test"):
        shutil.copy(FIXTURES / f"cifar10_tiny_{split}.parquet", folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, image_processor) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-vit"
    tiny_vit().save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def float_top1(cifar_test, image_processor) -> float:
    """Top-1 of the float tiny ViT on the test images the benchmarks evaluate."""
    return evaluate_accuracy(tiny_vit(), cifar_test.select(range(EVAL_IMAGES)), image_processor,
                             progress=False)["top1"]


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `benchmarks/<script>` in a fresh process, offline, from the repository root (`env`: extra variables)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=environment, cwd=ROOT, timeout=600, check=False)


def run_benchmark(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Runs a benchmark that must succeed and returns what it printed."""
    result = run_script(script, *args, env=env)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_accuracy_benchmark(tmp_path, dataset, model_dir, float_top1):
    run_benchmark("accuracy.py", "--dataset", str(dataset), "--models", str(model_dir), "--sources", "real",
                  "gaussian", "dfq-vit", "--bits", "w4a4", "--backends", "repq", "+log-sqrt2", "--ablation-bits",
                  "w4a4", "--ablation-sources", "gaussian", "--onnx-bits", "--num-images", "4", *QUICK,
                  "--output-dir", str(tmp_path))
    result = json.loads((tmp_path / "accuracy.json").read_text())
    cells = {(r["source"], r["backend"], r["bits"]): r["top1"] for r in result["rows"]}
    assert cells.pop(("float32", "-", "fp32")) == pytest.approx(float_top1)
    assert set(cells) == {("real", "repq", "w4a4"), ("gaussian", "repq", "w4a4"), ("gaussian", "+log-sqrt2", "w4a4"),
                          ("dfq-vit", "repq", "w4a4")}
    assert all(0.0 <= top1 <= 1.0 for top1 in cells.values())
    assert result["meta"]["dataset"] == str(dataset.resolve())  # another dataset's rows never merge with CIFAR-10's
    report = (tmp_path / "accuracy.md").read_text()
    assert report.startswith(f"# Accuracy benchmark (`{dataset.resolve()}` test top-1, %)")
    assert "| gaussian | +log-sqrt2 |" in report


def test_accuracy_benchmark_without_matplotlib_says_once_that_it_writes_no_plot(tmp_path, dataset, model_dir):
    # matplotlib comes with the [plot] extra only: without it the run must not claim accuracy.png, and says so once
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib blocked by the test')\n")
    python_path = os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))
    output = tmp_path / "out"
    printed = run_benchmark("accuracy.py", "--dataset", str(dataset), "--models", str(model_dir), "--sources",
                            "real", "gaussian", "--bits", "w4a4", "--backends", "repq", "--ablation-bits",
                            "--onnx-bits", "--num-images", "4", *QUICK, "--output-dir", str(output),
                            env={"PYTHONPATH": python_path})
    assert not (output / "accuracy.png").exists()
    assert printed.count("matplotlib") == 1 and 'pip install "optimum-dfq[plot]"' in printed
    assert printed.splitlines()[-1] == f"wrote {output / 'accuracy.md'}, accuracy.json, headline.md (no accuracy.png)"


def test_accuracy_benchmark_refuses_unknown_backend(tmp_path, dataset, model_dir):
    result = run_script("accuracy.py", "--dataset", str(dataset), "--models", str(model_dir), "--backends", "repq",
                        "+typo", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown or unsupported backend variant(s) ['+typo']" in result.stderr


def test_site_attribution_benchmark(tmp_path, dataset, model_dir, float_top1):
    run_benchmark("site_attribution.py", "--dataset", str(dataset), "--models", str(model_dir), "--sources", "real",
                  "dfq-vit", "--num-images", "4", *QUICK, "--output-dir", str(tmp_path))
    rows = json.loads((tmp_path / "site_attribution.json").read_text())["rows"]
    report = (tmp_path / "site_attribution.md").read_text()
    assert f"on the first {EVAL_IMAGES} `{dataset.resolve()}` test images" in report
    assert [row["source"] for row in rows] == ["real", "dfq-vit"]
    for row in rows:
        assert row["fp32"] == pytest.approx(100 * float_top1)
        assert {"probs", "fc1_input", "fc2_input"} <= set(row["sites"])
        assert all(0.0 <= top1 <= 100.0 for top1 in row["sites"].values())


def test_recipe_benchmark(tmp_path, dataset, model_dir, float_top1):
    recipes = [ROOT / "recipes" / "default.yaml", ROOT / "recipes" / "repq_vit_w4a4.yaml"]
    run_benchmark("recipes.py", *map(str, recipes), "--dataset", str(dataset), "--models", str(model_dir),
                  "--real-images", "4", *QUICK, "--synthesis-cache", str(tmp_path / "cache"),
                  "--output-dir", str(tmp_path))
    top1 = {row["recipe"]: row["top1"] for row in json.loads((tmp_path / "recipes.json").read_text())["rows"]}
    assert top1.pop("float32") == pytest.approx(float_top1)
    assert sorted(top1) == ["default", "repq_vit_w4a4"]
    assert (tmp_path / "recipes.md").read_text().startswith(f"# Recipe benchmark (`{dataset.resolve()}` test top-1")
    assert all(0.0 <= value <= 1.0 for value in top1.values())


def test_synthesis_speed_benchmark(tmp_path):
    output = tmp_path / "synthesis_speed.txt"
    run_benchmark("synthesis_speed.py", "--layers", "1", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                  "--threads", "1", "--output", str(output))
    lines = output.read_text().splitlines()
    assert lines[0].startswith("$ python benchmarks/synthesis_speed.py") and "optimum_dfq" in lines[1]
    ratios = {(cells[0], cells[1]): float(cells[-1]) for cells in map(str.split, lines)
              if len(cells) == 6 and cells[1] in ("1", "2")}
    expected = {(name, phase) for name in ("psaq", "sardfq", "dfq-vit", "dfq-vit+hardness") for phase in ("1", "2")}
    assert set(ratios) == expected and all(ratio > 0 for ratio in ratios.values())


def test_calibration_speed_benchmark(tmp_path):
    output = tmp_path / "calibration_speed.txt"
    run_benchmark("calibration_speed.py", "--layers", "1", "--images", "2", "--output", str(output))
    text = output.read_text()
    assert "x one forward pass); no quantile fallback was used" in text


def test_calibration_speed_benchmark_times_warm_forward_passes_on_the_given_threads(tmp_path):
    # the ratio's denominator is a median of warm forward passes, and the file says how many threads both sides ran on
    output = tmp_path / "calibration_speed.txt"
    run_benchmark("calibration_speed.py", "--layers", "1", "--images", "2", "--threads", "1", "--repeats", "2",
                  "--output", str(output))
    lines = output.read_text().splitlines()
    assert "1 thread(s)" in lines[2]
    assert "one FP forward pass (median of 2 after 1 warm-up):" in output.read_text()


def test_post_softmax_quantizer_benchmark():
    result = run_script("post_softmax_quantizers.py", "--model", "random", "--images", "8", "--bits", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    if importlib.util.find_spec("torchvision") is None:  # the random model has no saved processor: one is built
        assert "requires torchvision" not in result.stderr
    printed = result.stdout
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert {"tanq", "log2", "log_sqrt2", "uniform"} <= set(rows)
    for name in ("tanq", "log2", "log_sqrt2", "uniform"):
        mse, relative = (float(cell) for cell in rows[name].strip("| ").split("|")[1:])
        assert 0.0 <= mse and 0.0 <= relative


def test_post_softmax_quantizer_benchmark_calibrates_on_train_images_and_scores_every_swin_stage(tmp_path,
                                                                                                  image_processor):
    # Swin's later stages have fewer windows per image: splitting every layer's rows at the first layer's half left
    # their evaluation half empty (NaN) and put test images into their calibration
    folder = tmp_path / "tiny-swin"
    tiny_swin().save_pretrained(folder)
    image_processor.save_pretrained(folder)
    printed = run_benchmark("post_softmax_quantizers.py", "--model", str(folder), "--images", "8", "--bits", "3")
    assert "4 CIFAR-10 train images for calibration, 4 test images for evaluation" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| quantizer")]
    values = [float(cell) for row in rows for cell in row.strip("| ").split("|")[1:]]
    assert len(rows) == 6 and all(0.0 <= value < float("inf") for value in values)  # NaN fails both


def test_inference_speed_benchmark_records_date_and_versions(tmp_path):
    # the README says every speed figure is kept with the command, date, CPU and versions
    run_benchmark("inference_speed.py", "--skip-vit-small", "--skip-reference", "--threads", "1",
                  "--output", str(tmp_path / "inference_speed"))
    result = json.loads((tmp_path / "inference_speed.json").read_text())
    assert {"command", "date", "machine", "threads", "optimum_dfq", "torch", "onnxruntime"} <= set(result)
    header = (tmp_path / "inference_speed.md").read_text().splitlines()[:5]
    assert header[2].startswith(f"{result['date']}; optimum_dfq {result['optimum_dfq']}, torch {result['torch']}")
    assert header[4] == f"Command: `{result['command']}`"


def test_post_softmax_quantizer_benchmark_refuses_more_images_than_its_files_hold():
    result = run_script("post_softmax_quantizers.py", "--model", "random", "--images", "256")
    assert result.returncode == 1
    assert "cifar10_tiny_train.parquet holds 64 images, fewer than the 128 needed (half of --images)" in result.stderr


def test_inference_speed_accuracy_runs_on_the_given_dataset(dataset, tmp_path):
    run_benchmark("inference_speed.py", "--skip-vit-small", "--accuracy", "--eval-limit", "300", "--runs", "1",
                  "--warmup", "0", "--threads", "1", "--dataset", str(dataset), "--output", str(tmp_path / "speed"))
    rows = json.loads((tmp_path / "speed.json").read_text())["reference"]
    assert rows and all(row["num_test_images"] == 256 for row in rows)  # the fixture's test split, not CIFAR-10's
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    test = load_dataset(str(dataset), split="test")
    for row in rows:  # the float ONNX export scores as the float model does (one image may flip on float rounding)
        folder = ROOT / "examples" / "models" / row["model"]
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
        expected = evaluate_accuracy(model, test, AutoImageProcessor.from_pretrained(folder), progress=False)["top1"]
        assert abs(row["top1_fp32_onnx"] - expected) <= 1 / 256 + 1e-9


@pytest.mark.parametrize("script", ["accuracy.py", "recipes.py"])
def test_quick_smoke_runs_do_not_replace_the_committed_tables(script, dataset, model_dir, tmp_path):
    copy = tmp_path / "benchmarks"  # a copy of the scripts, so that their default output folders lie under tmp_path
    copy.mkdir()
    for file in (ROOT / "benchmarks").glob("*.py"):
        shutil.copy(file, copy / file.name)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    results = copy / "results" / ("recipes" if script == "recipes.py" else "")
    committed = results / f"{script[:-3]}.json"
    committed.parent.mkdir(parents=True, exist_ok=True)
    committed.write_text('{"the": "full run"}')
    common = ["--quick", "--dataset", str(dataset), "--models", str(model_dir), "--threads", "1"]
    args = (["--sources", "gaussian", "--bits", "w8a8", "--backends", "repq", "--ablation-bits", "--onnx-bits",
             "--num-images", "4"] if script == "accuracy.py"
            else [str(tmp_path / "recipes" / "repq_vit_w4a4.yaml"), "--real-images", "4", "--synthesis-cache",
                  str(tmp_path / "cache")])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(copy / script), *args, *common], capture_output=True, text=True,
                            env=environment, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed.read_text() == '{"the": "full run"}'
    assert json.loads((results / "quick" / f"{script[:-3]}.json").read_text())


def test_an_eval_limit_above_the_test_split_is_refused_not_clipped(dataset, model_dir):
    result = run_script("accuracy.py", "--dataset", str(dataset), "--models", str(model_dir), "--sources", "gaussian",
                        "--bits", "w8a8", "--eval-limit", "300", "--output-dir", "/nonexistent/never-written")
    assert result.returncode == 1
    assert "--eval-limit 300: the test split holds 256 images; pass 1 to 256" in result.stderr
