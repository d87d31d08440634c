"""The Hub quantize-and-push example, run offline on a tiny local model (the push itself is recorded)."""

import importlib.util
from pathlib import Path

import pytest

from optimum_dfq import DataFreeViTQuantizer

from ..conftest import CIFAR_MEAN, CIFAR_STD, FIXTURES, tiny_vit

ROOT = Path(__file__).resolve().parents[2]


def load_example():
    path = ROOT / "examples" / "quantize_deit_and_push.py"
    spec = importlib.util.spec_from_file_location("quantize_deit_and_push", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_evaluate_and_push(tmp_path, monkeypatch):
    from transformers import ViTImageProcessor

    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN, image_std=CIFAR_STD).save_pretrained(
        model_dir)
    pushed = {}
    monkeypatch.setattr(DataFreeViTQuantizer, "push_to_hub",
                        lambda self, qmodel, repo, **kw: pushed.update(repo=repo, qmodel=qmodel, **kw))

    load_example().main(["--model", str(model_dir), "--bits", "w4a8", "--synthesizer", "gaussian", "--num-images", "4",
                         "--save-dir", str(tmp_path / "out"), "--repo", "me/tiny-w4a8-dfq",
                         "--eval-dataset", str(FIXTURES / "cifar10_tiny_test.parquet"), "--eval-split", "test",
                         "--eval-limit", "8"])

    assert (tmp_path / "out" / "config.json").exists()
    assert pushed["repo"] == "me/tiny-w4a8-dfq"
    assert pushed["qmodel"].config.quantization_config.bits == "w4a8"
    results = pushed["eval_results"]
    assert len(results) == 2 and {r.metric_type for r in results} == {"accuracy"}
    assert all(0.0 <= r.metric_value <= 1.0 for r in results)
    assert all(r.dataset_type.endswith("cifar10_tiny_test.parquet") for r in results)


def test_a_recipe_keeps_its_bits_and_image_count(tmp_path):
    # --bits (default w4a4) and --num-images (default 32) used to replace the recipe's fields even when not given:
    # recipes/psaq_vit_w4a8.yaml or w8a8_integer_onnx.yaml quantized at W4A4
    from transformers import ViTImageProcessor

    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN, image_std=CIFAR_STD).save_pretrained(
        model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bits: w8a8\nsynthesizer: gaussian\nnum_images: 3\n")

    load_example().main(["--model", str(model_dir), "--recipe", str(recipe), "--save-dir", str(tmp_path / "out"),
                         "--no-push"])

    config = DataFreeViTQuantizer.from_pretrained(tmp_path / "out").model.config.quantization_config
    assert (config.bits, config.num_images, config.synthesizer) == ("w8a8", 3, "gaussian")
    load_example().main(["--model", str(model_dir), "--recipe", str(recipe), "--bits", "w4a8", "--num-images", "2",
                         "--save-dir", str(tmp_path / "out2"), "--no-push"])  # given explicitly, they still win
    config = DataFreeViTQuantizer.from_pretrained(tmp_path / "out2").model.config.quantization_config
    assert (config.bits, config.num_images) == ("w4a8", 2)


def test_a_save_dir_with_files_and_a_missing_repo_are_refused_before_quantizing(tmp_path, capsys):
    # --save-dir MODEL replaced the float model's weights with the quantized ones; without --repo (nor --no-push)
    # the run quantized and kept nothing, silently
    from transformers import ViTImageProcessor

    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN, image_std=CIFAR_STD).save_pretrained(
        model_dir)
    weights = (model_dir / "model.safetensors").read_bytes()
    common = ["--model", str(model_dir), "--synthesizer", "gaussian", "--num-images", "2"]
    for argv, message in [(["--save-dir", str(model_dir), "--no-push"], f"--save-dir {model_dir} already holds"),
                          ([], "pass --repo")]:
        with pytest.raises(SystemExit) as exit_info:
            load_example().main(common + argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (model_dir / "model.safetensors").read_bytes() == weights


def test_a_save_dir_under_the_home_folder_is_written_where_it_was_checked(tmp_path, monkeypatch):
    # the emptiness check expanded ~, the save did not: the model went to a folder literally named '~'
    from transformers import ViTImageProcessor

    model_dir = tmp_path / "model"
    tiny_vit().save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN, image_std=CIFAR_STD).save_pretrained(
        model_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    load_example().main(["--model", str(model_dir), "--synthesizer", "gaussian", "--num-images", "2",
                         "--save-dir", "~/out", "--no-push"])
    assert (tmp_path / "home" / "out" / "config.json").exists() and not (tmp_path / "~").exists()
