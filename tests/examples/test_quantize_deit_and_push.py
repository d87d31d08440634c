"""The Hub quantize-and-push example, run offline on a tiny local model (the push itself is recorded)."""

import importlib.util
from pathlib import Path

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
