"""The command line, driven as a user would: subprocesses, offline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import FIXTURES, tiny_vit, two_image_columns

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """Offline, quiet, one thread, and this checkout first on the path (the commands may run in another folder)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optimum_dfq.cli", *args], capture_output=True, text=True, check=False,
                          env={**_env(), **(env or {})}, cwd=cwd or ROOT, timeout=600,
                          stdin=subprocess.DEVNULL)  # off a terminal


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import ViTImageProcessor

    from ..conftest import CIFAR_MEAN, CIFAR_STD

    path = tmp_path_factory.mktemp("tiny-vit")
    tiny_vit().save_pretrained(path)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN, image_std=CIFAR_STD)
    processor.save_pretrained(path)
    return path


def test_help_explains_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("quantize", "synthesize", "evaluate", "export", "cache"):
        assert command in result.stdout
    quantize_help = run_cli("quantize", "--help").stdout
    for option in ("--bits", "--synthesizer", "--num-images", "--recipe", "--seed", "--push-to-hub", "--revision"):
        assert option in quantize_help
    text = " ".join(quantize_help.split())
    assert "number of calibration images (default: the recipe's, else 32)" in text  # a flag replaces the recipe's
    assert "(default: the recipe's, else 0)" in text and "without real data" not in text
    from optimum_dfq import list_recipes

    assert f"the name of one shipped with the package ({', '.join(list_recipes())}) or a file path" in text


def test_quantize_then_evaluate(model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()  # an existing empty folder is fine; one with files in it is refused (nothing is overwritten)
    result = run_cli("quantize", str(model_dir), str(out), "--bits", "w8a8", "--num-images", "4",
                     "--synthesizer", "gaussian")
    assert result.returncode == 0, result.stderr
    assert "w8a8" in result.stdout and (out / "config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == "w8a8"
    assert config["quantization_config"]["num_images"] == 4

    report = tmp_path / "reports" / "fp.json"  # its folder is created
    result = run_cli("evaluate", str(model_dir), "--dataset", str(FIXTURES / "cifar10_tiny_test.parquet"),
                     "--limit", "32", "--output", str(report))
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "top-5" in result.stdout
    data = json.loads(report.read_text())
    assert data["num_examples"] == 32 and 0.0 <= data["top1"] <= data["top5"] <= 1.0


@pytest.mark.parametrize("synthesizer, extra", [("gaussian", []), ("psaq", ["--iterations", "5", "--batch-size", "2"])])
def test_synthesize_saves_a_dataset_and_a_grid(model_dir, tmp_path, synthesizer, extra):
    from PIL import Image

    from optimum_dfq.synthesis import load_calibration_set

    out = tmp_path / "calib"
    result = run_cli("synthesize", str(model_dir), str(out), "--synthesizer", synthesizer, "--num-images", "3", *extra)
    assert result.returncode == 0, result.stderr
    calibration = load_calibration_set(out)
    assert calibration.pixel_values.shape == (3, 3, 32, 32)
    assert calibration.metadata["synthesizer"] == synthesizer
    if extra:  # 5 steps over psaq's 2 phases: all 5 run (3 + 2), and the stored metadata says so
        assert calibration.metadata["engine"]["iterations"] == [3, 2]
        assert "(5 steps: 3 + 2)" in result.stdout
        assert calibration.metadata["batch_size"] == 2  # batches 0-2, 2-3
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] >= 32 and grid.size[1] >= 32


def test_verbose_shows_the_loss_terms_and_cache_dir_resumes_an_interrupted_run(model_dir, tmp_path):
    """The loss terms are INFO logs, hidden by default and shown by --verbose; with --cache-dir a run started again
    after an interruption resumes from its finished batches and ends with the images of an uninterrupted run."""
    import shutil

    import torch

    from optimum_dfq.synthesis import load_calibration_set

    cache = tmp_path / "cache"
    args = ["--synthesizer", "psaq", "--num-images", "2", "--batch-size", "1", "--iterations", "4", "--cache-dir",
            str(cache)]
    quiet = run_cli("synthesize", str(model_dir), str(tmp_path / "a"), *args)
    assert quiet.returncode == 0, quiet.stderr
    assert "step 1/4" not in quiet.stderr
    assert sorted(path.name for path in cache.glob("*/shards/*.safetensors")) == [
        "00000000-00000001.safetensors", "00000001-00000002.safetensors"]
    shutil.rmtree(next(cache.glob("*/calibration_set")))  # as if interrupted during the second batch
    next(cache.glob("*/shards/00000001-00000002.safetensors")).unlink()
    verbose = run_cli("synthesize", str(model_dir), str(tmp_path / "b"), *args, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "Resuming: 1 of 2 images already cached" in verbose.stderr
    assert "images 1-1 step 1/4" in verbose.stderr and "ce=" in verbose.stderr
    assert "images 0-0 step" not in verbose.stderr  # the cached batch is not optimised again
    assert "synthesized 2 images with 'psaq' (4 steps: 2 + 2), 1 of them resumed from the synthesis cache" in (
        verbose.stdout)
    first, resumed = load_calibration_set(tmp_path / "a"), load_calibration_set(tmp_path / "b")
    assert torch.equal(first.pixel_values, resumed.pixel_values)


def test_synthesis_uses_the_default_cache_unless_no_cache(model_dir, tmp_path, default_synthesis_cache):
    args = ["--synthesizer", "psaq", "--num-images", "2", "--iterations", "2"]
    off = run_cli("synthesize", str(model_dir), str(tmp_path / "a"), *args, "--no-cache")
    assert off.returncode == 0, off.stderr
    assert not default_synthesis_cache.exists()
    on = run_cli("synthesize", str(model_dir), str(tmp_path / "b"), *args, "--checkpoint-every", "1")
    assert on.returncode == 0, on.stderr
    assert len(list(default_synthesis_cache.glob("*/calibration_set"))) == 1
    again = run_cli("synthesize", str(model_dir), str(tmp_path / "c"), *args, "--verbose")
    assert again.returncode == 0, again.stderr
    assert f"Loading the cached calibration set from {default_synthesis_cache}" in again.stderr
    assert "synthesized 2 images with 'psaq'" in on.stdout
    assert "loaded 2 images with 'psaq' (2 steps: 1 + 1) from the synthesis cache (no step run)" in again.stdout


def test_quantize_with_real_calibration_data(model_dir, tmp_path):
    """--calibration-dataset replaces a recipe's dataset, and the saved config and the result line name the one used."""
    recipe = tmp_path / "real.yaml"
    recipe.write_text("bits: w4a8\ncalibration_dataset:\n  path: ILSVRC/imagenet-1k\n  split: train\n")
    data = str(FIXTURES / "cifar10_tiny_train.parquet")
    result = run_cli("quantize", str(model_dir), str(tmp_path / "q"), "--recipe", str(recipe), "--num-images", "8",
                     "--calibration-dataset", data)
    assert result.returncode == 0, result.stderr
    assert f"8 calibration images from real images ({data})" in result.stdout
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["calibration_dataset"] == {"path": data, "split": "train"}


def test_quantize_with_a_bundled_recipe_by_name(model_dir, tmp_path):
    """--recipe takes a bundled recipe's name from any folder; its flags still replace the recipe's fields."""
    result = run_cli("quantize", str(model_dir), str(tmp_path / "q"), "--recipe", "sardfq_w4a4", "--synthesizer",
                     "gaussian", "--num-images", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (config["post_softmax"], config["input_range"], config["synthesizer"]) == ("log2", "calibrated", "gaussian")


def test_quantize_from_a_synthesized_set(model_dir, tmp_path):
    """The folder written by `synthesize` calibrates `quantize` whole, and is reported as synthetic, not real."""
    from optimum_dfq.synthesis import get_synthesizer, save_calibration_set

    calibration = get_synthesizer("gaussian").synthesize(tiny_vit(), 3, seed=0)
    save_calibration_set(calibration, tmp_path / "calib")
    result = run_cli("quantize", str(model_dir), str(tmp_path / "q"), "--bits", "w8a8",
                     "--calibration-dataset", str(tmp_path / "calib"))
    assert result.returncode == 0, result.stderr
    assert f"3 calibration images from 'gaussian' (saved set {tmp_path / 'calib'})" in result.stdout, result.stdout
    assert "real images" not in result.stdout


@pytest.mark.parametrize(
    "args, reason",
    [
        (["quantize", "{model}", "{out}", "--bits", "w4x4"], "Unknown bit preset 'w4x4'"),
        (["quantize", "{model}", "{out}", "--bits", "w9a9"], "outside 2..8"),
        (["quantize", "{missing}", "{out}"], "no model folder at {missing}"),
        (["synthesize", "{missing}", "{out}"], "no model folder at {missing}"),
        (["quantize", "nobody-here/missing-model", "{out}"], "no local folder nobody-here/missing-model in"),
        (["quantize", "{model}", "{out}", "--synthesizer", "dreams"], "Unknown synthesizer 'dreams'"),
        (["quantize", "{model}", "{out}", "--recipe", "{bad_recipe}"], "not valid YAML"),
        (["quantize", "{model}", "{out}", "--recipe", "{unknown_key_recipe}"], "wieght_bits"),
        (["quantize", "{model}", "{out}", "--recipe", "{missing}.yaml"], "does not exist"),
        (["quantize", "{model}", "{out}", "--recipe", "sardfq"],
         "Unknown recipe 'sardfq' (did you mean 'sardfq_w4a4'?): no such file"),
        (["quantize", "{model}", "{out}", "--num-images", "0"], "--num-images must be at least 1"),
        (["quantize", "{model}", "{out}", "--private"], "--private applies to the Hub repo that --push-to-hub"),
        (["quantize", "{model}", "{out}", "--revision", "v1"], "--revision v1 selects a version of a Hub model, but"),
        (["export", "{model}", "{out}.onnx", "--revision", "v1"], "drop --revision, or pass the Hub id"),
        (["evaluate", "{model}", "--dataset", "{missing}.parquet"], "does not exist"),
        (["export", "{model}", "{out}.onnx"], "is not a quantized model"),
    ],
)
def test_bad_input_is_one_line_without_traceback(model_dir, tmp_path, args, reason):
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("bits: [w4a4\n")
    unknown_key_recipe = tmp_path / "unknown.yaml"
    unknown_key_recipe.write_text("wieght_bits: 4\n")
    values = {"model": str(model_dir), "out": str(tmp_path / "out"), "missing": str(tmp_path / "missing-model"),
              "bad_recipe": str(bad_recipe), "unknown_key_recipe": str(unknown_key_recipe)}
    result = run_cli(*[a.format(**values) for a in args], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("optimum-dfq: error:")]
    assert len(lines) == 1 and reason.format(**values) in lines[0], result.stderr


@pytest.mark.parametrize("damage, reason", [
    ("truncated weights", "model.safetensors is corrupt or truncated"),  # was a SafetensorError traceback
    ("backbone only", "has no weights for classifier.bias, classifier.weight"),  # was quantized with a random head
])
def test_a_damaged_float_checkpoint_is_one_line_and_nothing_is_saved(damage, reason, tmp_path, monkeypatch, capsys):
    from transformers import ViTModel

    from optimum_dfq.cli import main

    model = tmp_path / "model"
    if damage == "backbone only":
        ViTModel(tiny_vit().config).save_pretrained(model)
    else:
        tiny_vit().save_pretrained(model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", str(model), str(tmp_path / "out"), "--synthesizer", "gaussian", "--num-images", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("optimum-dfq: error:") and reason in lines[-1], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["evaluate", "{model}", "--dataset", str(FIXTURES / "cifar10_tiny_test.parquet")],
    ["synthesize", "{model}", "{out}", "--synthesizer", "psaq", "--num-images", "2"],
    ["quantize", "{model}", "{out}", "--num-images", "2"],
    ["quantize", "{model}", "{out}", "--calibration-dataset", str(FIXTURES / "cifar10_tiny_train.parquet")],
])
def test_a_model_folder_without_image_processor_gets_a_fix_a_command_line_user_can_apply(args, tmp_path, monkeypatch,
                                                                                          capsys):
    # the messages said "pass image_processor=AutoImageProcessor.from_pretrained(...)" (or image_mean=/image_std=),
    # arguments the command line does not have
    from optimum_dfq.cli import main

    tiny_vit().save_pretrained(tmp_path / "model")  # no preprocessor_config.json
    monkeypatch.chdir(tmp_path)
    values = {"model": str(tmp_path / "model"), "out": str(tmp_path / "out")}
    assert main([a.format(**values) for a in args]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("optimum-dfq: error:") and "has no image processor (no preprocessor_config.json)" in error
    assert "save_pretrained" in error and "image_processor=" not in error and not (tmp_path / "out").exists()


def test_a_model_folder_without_image_processor_quantizes_from_a_synthesized_set(tmp_path, monkeypatch, capsys):
    # a folder written by `synthesize` holds pixel values already preprocessed: no image processor is needed (it was
    # refused as "calibrating on real images")
    from optimum_dfq.cli import main
    from optimum_dfq.synthesis import get_synthesizer, save_calibration_set

    tiny_vit().save_pretrained(tmp_path / "model")  # no preprocessor_config.json
    save_calibration_set(get_synthesizer("gaussian").synthesize(tiny_vit(), 3, seed=0), tmp_path / "calib")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"bits: w8a8\ncalibration_dataset:\n  path: {tmp_path / 'calib'}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    model = str(tmp_path / "model")
    assert main(["quantize", model, str(tmp_path / "q"), "--bits", "w8a8", "--calibration-dataset",
                 str(tmp_path / "calib")]) == 0, capsys.readouterr().err
    assert main(["quantize", model, str(tmp_path / "q2"), "--recipe", str(recipe)]) == 0, capsys.readouterr().err
    assert "3 calibration images from 'gaussian'" in capsys.readouterr().out


@pytest.fixture
def no_model_loading(monkeypatch):
    """Makes loading a model fail the test: the checks under test must refuse the input before any load/download."""
    from optimum_dfq.quantizer import DataFreeViTQuantizer

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the command-line input was checked")

    monkeypatch.setattr(DataFreeViTQuantizer, "from_pretrained", fail)


@pytest.mark.usefixtures("no_model_loading")
@pytest.mark.parametrize(
    "args, reason",
    [
        (["quantize", "{model}", "{out}", "--bits", "w4x4"], "Unknown bit preset 'w4x4'"),
        (["quantize", "{model}", "{out}", "--synthesizer", "dreams"], "Unknown synthesizer 'dreams'"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "dreams"], "Unknown synthesizer 'dreams'"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "gaussian", "--iterations", "4"], "drop --iterations"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "psaq", "--iterations", "1"], "at least 2"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "gaussian", "--batch-size", "2"], "drop --batch-size"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "psaq", "--batch-size", "0"], "--batch-size must be at"),
        (["quantize", "{model}", "{out}", "--calibration-dataset", "x.parquet", "--batch-size", "2"],
         "calibrates on real images; drop --batch-size"),
        (["synthesize", "{missing}", "{out}"], "no model folder at {missing}"),
        (["quantize", "./missing-model", "{out}"], "no model folder at {tmp}/missing-model"),
        (["quantize", "~/surely-missing-model-folder", "{out}"], "no model folder at {home}/surely-missing"),
        (["quantize", "models/vit/missing-model", "{out}"], "no model folder at {tmp}/models/vit/missing-model"),
        (["quantize", "{model}/config.json", "{out}"], "is a file; pass the model folder that holds config.json"),
        (["evaluate", "{tmp}", "--dataset", "x.parquet"], "holds no config.json, so it is not a model folder"),
        (["quantize", "{model}", "{out}", "--calibration-dataset", "x.parquet", "--synthesizer", "psaq"],
         "--synthesizer psaq would not be used: the images come from --calibration-dataset (x.parquet)"),
        (["quantize", "{model}", "{out}", "--recipe", "{recipes}/repq_vit_w4a4.yaml", "--synthesizer", "psaq"],
         "the images come from the recipe's calibration_dataset (ILSVRC/imagenet-1k)"),
        (["quantize", "{model}", "{out}", "--recipe", "{recipes}/dfq_vit_hardness_w4a4.yaml", "--synthesizer", "psaq"],
         "the recipe's synthesizer_kwargs {{'hardness_weight': 10.0}} are for 'dfq-vit'"),
        (["quantize", "{model}", "{out}", "--synthesizer", "gaussian", "--batch-size", "2"], "drop --batch-size"),
        (["quantize", "{model}", "{out}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["quantize", "{model}", "{out}", "--image-column", "img"],
         "--image-column img would not be used: this run synthesizes its calibration images"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "gaussian", "--cache-dir", "{tmp}/c"],
         "has no cache; drop --cache-dir"),
        (["quantize", "{model}", "{out}", "--synthesizer", "gaussian", "--cache-dir", "{tmp}/c"],
         "has no cache; drop --cache-dir"),
        (["quantize", "{model}", "{out}", "--calibration-dataset", "x.parquet", "--cache-dir", "{tmp}/c"],
         "calibrates on real images; drop --cache-dir"),
        (["quantize", "{model}", "{out}", "--calibration-dataset", "x.parquet", "--no-cache"],
         "calibrates on real images; drop --no-cache"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "gaussian", "--no-cache"],
         "has no cache; drop --no-cache"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "psaq", "--checkpoint-every", "5", "--no-cache"],
         "which --no-cache turns off; drop one of them"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "gaussian", "--checkpoint-every", "5", "--cache-dir",
          "{tmp}/c"], "nothing to checkpoint; drop --checkpoint-every"),
        (["synthesize", "{model}", "{out}", "--synthesizer", "psaq", "--checkpoint-every", "5"],  # conftest: cache off
         "which OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE turns off; add --cache-dir DIR"),
        (["synthesize", "{model}", "{out}", "--checkpoint-every", "-1", "--cache-dir", "{tmp}/c"],
         "--checkpoint-every must be a number of steps >= 0"),
        (["quantize", "{model}", "{out}", "--checkpoint-every", "5"],
         "which OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE turns off; add --cache-dir DIR"),
        (["quantize", "{model}", "{out}", "--synthesizer", "gaussian", "--checkpoint-every", "5"],
         "nothing to checkpoint; drop --checkpoint-every"),
        (["quantize", "{model}", "{out}", "--calibration-dataset", "x.parquet", "--checkpoint-every", "5"],
         "calibrates on real images; drop --checkpoint-every"),
        (["evaluate", "{model}", "--dataset", "x.parquet", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["evaluate", "{model}", "--dataset", "x.parquet", "--limit", "0"], "--limit must be at least 1"),
        (["evaluate", "{model}", "--dataset", "x.parquet", "--output", "{tmp}"], "--output {tmp} is a folder"),
        (["export", "{model}", "{tmp}"], "{tmp} is a folder"),
        (["quantize", "{model}", "{model}"], "{model} already holds config.json"),
        (["synthesize", "{model}", "{model}", "--synthesizer", "gaussian"], "{model} already holds config.json"),
        (["quantize", "{model}", "{model}/config.json"], "{model}/config.json is a file, not a folder"),
    ],
)
def test_input_is_checked_before_the_model_is_loaded(model_dir, tmp_path, monkeypatch, capsys, args, reason):
    from optimum_dfq.cli import main

    monkeypatch.chdir(tmp_path)
    values = {"model": str(model_dir), "out": str(tmp_path / "out"), "missing": str(tmp_path / "missing-model"),
              "tmp": str(tmp_path), "home": str(Path.home()), "recipes": str(ROOT / "recipes")}
    assert main([a.format(**values) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optimum-dfq: error:") and reason.format(**values) in lines[0]


@pytest.mark.parametrize("command", ["synthesize", "quantize"])
def test_cache_dir_and_no_cache_exclude_each_other(command, capsys):
    from optimum_dfq.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "model", "out", "--no-cache", "--cache-dir", "cache"])
    assert exit_info.value.code == 2
    assert "argument --cache-dir: not allowed with argument --no-cache" in capsys.readouterr().err


def test_checkpoint_every_reaches_the_synthesizer_and_the_saved_config(model_dir, tmp_path):
    from optimum_dfq.cli import _build_synthesizer

    synthesizer = _build_synthesizer("psaq", 5, 7)
    assert synthesizer.checkpoint_every == 7 and synthesizer.iterations == (3, 2)
    assert _build_synthesizer("psaq", None, 0).checkpoint_every == 0
    out = tmp_path / "q"
    result = run_cli("quantize", str(model_dir), str(out), "--bits", "w8a8", "--num-images", "2", "--synthesizer",
                     "psaq", "--recipe", str(_tiny_psaq_recipe(tmp_path)), "--cache-dir", str(tmp_path / "cache"),
                     "--checkpoint-every", "3")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["synthesizer_kwargs"]["checkpoint_every"] == 3


def _tiny_psaq_recipe(folder: Path) -> Path:
    recipe = folder / "tiny_psaq.yaml"
    recipe.write_text("synthesizer: psaq\nsynthesizer_kwargs:\n  iterations: [1, 1]\n  warmup: 1\n")
    return recipe


def test_sigterm_during_synthesis_ends_with_one_line_and_status_143(capsys, monkeypatch):
    import argparse

    from optimum_dfq.cli import dispatch
    from optimum_dfq.synthesis.engine import SynthesisTerminated

    def preempted(args):
        raise SynthesisTerminated("SIGTERM received")

    monkeypatch.delenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE")
    assert dispatch(argparse.Namespace(handler=preempted)) == 143
    assert capsys.readouterr().err.strip() == ("optimum-dfq: terminated by SIGTERM during synthesis; run the same "
                                               "command again to resume from what the synthesis cache kept.")
    assert dispatch(argparse.Namespace(handler=preempted, no_cache=True)) == 143
    assert capsys.readouterr().err.strip() == ("optimum-dfq: terminated by SIGTERM during synthesis; nothing was kept "
                                               "(--no-cache).")
    # the default cache turned off: nothing was kept either, so "run the same command again to resume" was wrong
    monkeypatch.setenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE", "1")
    assert dispatch(argparse.Namespace(handler=preempted, no_cache=False, cache_dir=None)) == 143
    assert capsys.readouterr().err.strip() == ("optimum-dfq: terminated by SIGTERM during synthesis; nothing was kept "
                                               "(OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE turns the default synthesis cache "
                                               "off).")
    assert dispatch(argparse.Namespace(handler=preempted, no_cache=False, cache_dir="cache")) == 143
    assert "run the same command again to resume" in capsys.readouterr().err  # an explicit --cache-dir still caches

    def interrupted(args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C keeps Python's own handling
        dispatch(argparse.Namespace(handler=interrupted))


def test_split_iterations_spreads_the_remainder():
    from optimum_dfq.cli import split_iterations

    assert split_iterations(5, 2) == [3, 2]
    assert split_iterations(7, 3) == [3, 2, 2]
    assert split_iterations(1000, 2) == [500, 500]
    assert split_iterations(2, 2) == [1, 1]


def test_quantize_then_export_to_onnx(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "q"
    assert run_cli("quantize", str(model_dir), str(out), "--bits", "w4a8", "--num-images", "4").returncode == 0
    (out / "preprocessor_config.json").unlink()  # the export needs no image processor: nothing to warn about
    result = run_cli("export", str(out), str(tmp_path / "model.onnx"))
    assert result.returncode == 0, result.stderr
    assert "image processor" not in result.stderr
    assert "MatMulNBits" in result.stdout and "onnxruntime vs PyTorch" in result.stdout
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report["integer_operators"] > 0 and report["top1_agreement"] == 1.0
    assert (tmp_path / "model.onnx").stat().st_size == report["file_size"]


def test_optimum_cli_lists_dfq():
    result = subprocess.run(["optimum-cli", "--help"], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0
    assert "dfq" in result.stdout
    sub = subprocess.run(["optimum-cli", "dfq", "quantize", "--help"], capture_output=True, text=True, check=False,
                         timeout=300)
    assert sub.returncode == 0 and "--bits" in sub.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli_torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m optimum_dfq.cli ARGS` on CPU (stdout of both processes, not tagged)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "optimum_dfq.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, env=_env(), cwd=cwd, timeout=600)


@pytest.mark.slow
def test_synthesize_under_torchrun_writes_and_prints_once(model_dir, tmp_path):
    from optimum_dfq.synthesis import load_calibration_set

    out = tmp_path / "calib"
    result = run_cli_torchrun("synthesize", str(model_dir), str(out), "--synthesizer", "psaq", "--num-images", "4",
                              "--iterations", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("synthesized")] == [
        f"synthesized 4 images with 'psaq' (2 steps: 1 + 1); saved to {out} (preview: {out / 'grid.png'})"
    ], result.stdout
    calibration = load_calibration_set(out)
    assert calibration.pixel_values.shape == (4, 3, 32, 32)
    assert calibration.metadata["engine"]["iterations"] == [1, 1]
    assert calibration.metadata["batch_size"] == 2 and "stay idle" not in result.stderr  # a batch for each process


@pytest.mark.slow
def test_synthesize_under_torchrun_shares_the_default_cache(model_dir, tmp_path, default_synthesis_cache):
    # every process of one machine agrees on the default folder: the run caches there and a second run loads it
    args = ["--synthesizer", "psaq", "--num-images", "4", "--iterations", "2"]
    first = run_cli_torchrun("synthesize", str(model_dir), str(tmp_path / "a"), *args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "default cache" not in first.stderr  # no warning that the default was dropped
    (run,) = default_synthesis_cache.iterdir()
    assert sorted(path.name for path in (run / "shards").iterdir()) == ["00000000-00000002.safetensors",
                                                                       "00000002-00000004.safetensors"]
    again = run_cli_torchrun("synthesize", str(model_dir), str(tmp_path / "b"), *args, "--verbose", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"Loading the cached calibration set from {run / 'calibration_set'}" in again.stderr


@pytest.mark.slow
def test_quantize_under_torchrun_saves_and_prints_once(model_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("bits: w8a8\nsynthesizer: psaq\nsynthesizer_kwargs:\n  iterations: [1, 1]\n  warmup: 1\n")
    out = tmp_path / "q"
    result = run_cli_torchrun("quantize", str(model_dir), str(out), "--recipe", str(recipe), "--num-images", "4",
                              cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("quantized")]
    assert len(lines) == 1 and "w8a8 with 4 calibration images from 'psaq'" in lines[0], result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["num_images"] == 4


@pytest.mark.slow
def test_quantize_under_torchrun_shows_progress_bars_once(model_dir, tmp_path):
    """The other processes repeat the calibration, silently: one bar per step, not one per process."""
    recipe = tmp_path / "bars.yaml"
    recipe.write_text("bits: w4a4\nsynthesizer: psaq\ncalibration_order: parallel\nsynthesizer_kwargs:\n"
                      "  iterations: [1, 1]\n  warmup: 1\nreconstruction:\n  iterations: 2\n")
    result = run_cli_torchrun("quantize", str(model_dir), str(tmp_path / "q"), "--recipe", str(recipe),
                              "--num-images", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for bar in ("Loading weights", "psaq synthesis", "calibration", "block reconstruction", "reconstruct vit.layers.0"):
        starts = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith(f"{bar}:   0%")]
        assert len(starts) == 1, (bar, result.stderr[-3000:])


@pytest.mark.slow
def test_warnings_under_torchrun_are_printed_once(model_dir, tmp_path):
    recipe = tmp_path / "weight_only.yaml"  # a weight-only preset with an activation option: a warning
    recipe.write_text("bits: w4a16\npost_softmax: tanq\nsynthesizer: gaussian\n")
    result = run_cli_torchrun("quantize", str(model_dir), str(tmp_path / "q"), "--recipe", str(recipe),
                              "--num-images", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.count("is weight-only (activations stay float)") == 1, result.stderr[-3000:]


class _GPUState:
    """The accelerate state of process 1 of a 2-GPU launch, as the CLI sees it (no collective is run)."""

    is_main_process = True
    device = None

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()

    def wait_for_everyone(self):
        pass


@pytest.mark.parametrize("command", ["synthesize", "quantize"])
def test_synthesis_runs_on_the_device_of_the_process(model_dir, tmp_path, monkeypatch, command):
    """Under `accelerate launch --multi_gpu` each process synthesizes on its own GPU, not on the CPU where
    `from_pretrained` leaves the model."""
    import torch

    from optimum_dfq import cli
    from optimum_dfq.synthesis.pixel_synthesizer import PixelSynthesizer

    state = _GPUState()
    state.device = torch.device("cuda", 1)
    monkeypatch.setattr(cli, "_process_state", lambda: state)
    devices = []
    synthesize = PixelSynthesizer.synthesize

    def recording(self, model, num_images, *, device=None, **kwargs):
        devices.append(device)
        return synthesize(self, model, num_images, **kwargs)  # here on the CPU: this machine has no GPU

    monkeypatch.setattr(PixelSynthesizer, "synthesize", recording)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("bits: w8a8\nsynthesizer: psaq\nsynthesizer_kwargs:\n  iterations: [1, 1]\n  warmup: 1\n")
    flags = ["--synthesizer", "psaq", "--iterations", "2"] if command == "synthesize" else ["--recipe", str(recipe)]
    assert cli.main([command, str(model_dir), str(tmp_path / "out"), "--num-images", "2", *flags]) == 0
    assert devices == [torch.device("cuda", 1)]


def test_revision_loads_that_version_of_a_hub_model(model_dir, tmp_path):
    """`--revision` reaches the Hub download: offline, a cache holding the model only at branch `v1` (no `main`)
    quantizes with `--revision v1` and cannot without it."""
    commit = "b" * 40
    repo = tmp_path / "hub-cache" / "models--org--tiny-vit"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    flags = ["--synthesizer", "gaussian", "--num-images", "2"]
    result = run_cli("quantize", "org/tiny-vit", str(tmp_path / "at-v1"), "--revision", "v1", *flags, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "at-v1" / "model.safetensors").is_file()
    result = run_cli("synthesize", "org/tiny-vit", str(tmp_path / "calib"), "--revision", "v1", *flags, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("quantize", "org/tiny-vit", str(tmp_path / "at-main"), *flags, env=env)
    assert result.returncode != 0 and not (tmp_path / "at-main" / "model.safetensors").exists()


def test_private_creates_the_pushed_repo_private(model_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from optimum_dfq import cli

    pushed = []
    monkeypatch.setattr(PreTrainedModel, "push_to_hub", lambda self, repo, **kwargs: pushed.append((repo, kwargs)))
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out"), "--synthesizer", "gaussian", "--num-images",
                     "2", "--push-to-hub", "me/tiny-dfq", "--private"]) == 0
    assert pushed == [("me/tiny-dfq", {"private": True})]


def test_under_a_launcher_the_other_processes_do_not_wait_for_the_hub_upload(model_dir, tmp_path, monkeypatch):
    """Rank 0 pushes after the last barrier: an upload longer than the process group's timeout (30 minutes) would
    otherwise end the run with the others' barrier timing out."""
    from transformers import PreTrainedModel

    from optimum_dfq import cli

    events = []

    class MainProcess(_GPUState):
        def wait_for_everyone(self):
            events.append("barrier")

    monkeypatch.setattr(cli, "_process_state", MainProcess)
    monkeypatch.setattr(PreTrainedModel, "push_to_hub",
                        lambda self, repo, **kwargs: events.append(f"push {repo} private={kwargs.get('private')}"))
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out"), "--synthesizer", "gaussian", "--num-images",
                     "2", "--push-to-hub", "me/tiny-dfq"]) == 0
    assert events == ["barrier", "push me/tiny-dfq private=None"]  # the Hub's default visibility
    assert (tmp_path / "out" / "config.json").exists()  # saved before the barrier


def test_errors_under_a_launcher_name_the_rank(monkeypatch, capsys):
    import argparse

    from optimum_dfq.cli import dispatch
    from optimum_dfq.errors import ConfigError

    def failing(args):
        raise ConfigError("bad recipe")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dispatch(argparse.Namespace(handler=failing)) == 2
    assert capsys.readouterr().err.strip() == "optimum-dfq: error: [rank 1] bad recipe"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dispatch(argparse.Namespace(handler=failing)) == 2
    assert capsys.readouterr().err.strip() == "optimum-dfq: error: bad recipe"


def test_a_successful_run_releases_the_process_group_and_a_failed_one_keeps_it(tmp_path, monkeypatch):
    """Gloo threads left at interpreter exit can abort a finished torchrun run; after an error another process may
    still be in a collective, so the group is only destroyed after success."""
    import torch.distributed as dist

    from optimum_dfq import cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        argv = ["synthesize", "model", "out"]
        monkeypatch.setattr(cli, "dispatch", lambda args, parser: 2)
        assert cli.main(argv) == 2 and dist.is_initialized()
        monkeypatch.setattr(cli, "dispatch", lambda args, parser: 0)
        assert cli.main(argv) == 0 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_evaluate_refuses_another_datasets_class_names_unless_told(tmp_path):
    from transformers import ViTImageProcessor

    from ..conftest import CIFAR_MEAN, CIFAR_STD

    model = tiny_vit()
    model.config.id2label = {i: f"digit_{i}" for i in range(10)}
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    model.save_pretrained(tmp_path / "digits")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN,
                      image_std=CIFAR_STD).save_pretrained(tmp_path / "digits")
    args = ["evaluate", str(tmp_path / "digits"), "--dataset", str(FIXTURES / "cifar10_tiny_test.parquet"),
            "--limit", "8"]
    refused = run_cli(*args)
    assert refused.returncode == 2 and "class names are not the model's" in refused.stderr, refused.stderr
    assert run_cli(*args, "--no-class-name-check").returncode == 0


def test_without_split_flags_a_folder_of_one_split_is_read_as_the_split_it_holds(model_dir, cifar_test, tmp_path,
                                                                                    capsys):
    # --split defaulted to test and --calibration-split to train, refusing a folder saved as "validation"
    from datasets import DatasetDict

    from optimum_dfq.cli import main

    DatasetDict({"validation": cifar_test.select(range(8))}).save_to_disk(str(tmp_path / "val"))
    assert main(["evaluate", str(model_dir), "--dataset", str(tmp_path / "val")]) == 0
    assert f"(8 examples of {tmp_path / 'val'}:validation)" in capsys.readouterr().out
    assert main(["quantize", str(model_dir), str(tmp_path / "q"), "--bits", "w8a8", "--num-images", "4",
                 "--calibration-dataset", str(tmp_path / "val")]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["calibration_dataset"] == {"path": str(tmp_path / "val"), "split": "validation"}
    assert main(["evaluate", str(model_dir), "--dataset", str(tmp_path / "val"), "--split", "test"]) == 2
    assert "has no split 'test'" in capsys.readouterr().err  # a split named is still the one read


def test_column_flags_reach_the_dataset_and_a_saved_split_must_match(model_dir, cifar_test, tmp_path, monkeypatch,
                                                                    capsys):
    """A dataset with two Image columns and two ClassLabel columns of the model's classes: the command line could
    not choose which were read (the first ones were, without a word), and a folder saved as the test split was read
    for any --split."""
    from optimum_dfq.cli import main

    def run(*args: str) -> tuple[int, str]:
        status = main(list(args))
        return status, capsys.readouterr().err.strip()

    subset = two_image_columns(cifar_test.select(range(8)))
    subset.add_column("again", subset["label"], feature=subset.features["label"]).save_to_disk(tmp_path / "pairs")
    monkeypatch.chdir(tmp_path)
    evaluate = ["evaluate", str(model_dir), "--dataset", str(tmp_path / "pairs")]
    status, error = run(*evaluate)
    assert status == 2 and "several image columns ['img', 'other']" in error and "--image-column img" in error
    status, error = run(*evaluate, "--image-column", "other")
    assert status == 2 and "several ClassLabel columns ['label', 'again']" in error and "--label-column" in error
    status, error = run(*evaluate, "--image-column", "photo", "--label-column", "label")
    assert status == 2 and "image_column='photo' is not a column of the dataset" in error
    status, error = run(*evaluate, "--image-column", "other", "--label-column", "label", "--output", "r.json")
    assert status == 0, error
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["image_column"] == "other" and results["label_column"] == "label" and results["split"] == "test"
    status, error = run(*evaluate, "--image-column", "other", "--label-column", "label", "--split", "train")
    assert status == 2 and "was saved as split 'test', not 'train'" in error

    quantize = ["quantize", str(model_dir), str(tmp_path / "q"), "--bits", "w8a8", "--num-images", "4",
                "--calibration-dataset", str(tmp_path / "pairs"), "--calibration-split", "test"]
    status, error = run(*quantize, "--label-column", "label")
    assert status == 2 and "several image columns" in error and not (tmp_path / "q").exists()
    status, error = run(*quantize, "--image-column", "other", "--label-column", "label")
    assert status == 0, error
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["calibration_dataset"] == {"path": str(tmp_path / "pairs"), "split": "test",
                                             "image_column": "other", "label_column": "label"}
    # calibration does not use labels: two ClassLabel columns and no --label-column read none, not an error; with no
    # --calibration-split, a folder of one split is read as the split it holds
    quantize = quantize[:-2]
    quantize[2] = str(tmp_path / "q2")
    status, error = run(*quantize, "--image-column", "other")
    assert status == 0, error
    config = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]
    assert config["calibration_dataset"] == {"path": str(tmp_path / "pairs"), "split": "test", "image_column": "other"}
