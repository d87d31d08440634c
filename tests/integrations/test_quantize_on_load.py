"""`from_pretrained(float_checkpoint, quantization_config=DFQConfig(...))`: quantizing inside transformers' loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel, ViTImageProcessor, ViTModel

from optimum_dfq import CheckpointError, ConfigError, DataFreeViTQuantizer, DFQConfig, UnsupportedArchitectureError
from optimum_dfq.integrations.transformers import DFQHfQuantizer

from ..conftest import CIFAR_MEAN, FIXTURES, tiny_vit
from .conftest import logits

pytestmark = pytest.mark.usefixtures("single_thread")

#: a synthesizer that optimises images (seeded, cached), kept to a few steps
SYNTHESIS = DFQConfig(bits="w4a4", synthesizer="psaq", num_images=2,
                      synthesizer_kwargs={"iterations": [2, 2], "warmup": 1})
NOISE = DFQConfig(bits="w4a4", synthesizer="gaussian", num_images=4)
COMMIT, OLD_COMMIT = "a" * 40, "b" * 40
REPO = "dfq-test/tiny-vit"


def save_float_model(folder: Path, image_processor=None) -> Path:
    tiny_vit().save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    return folder


def reference(source, config: DFQConfig, **kwargs):
    """What the brief's equivalent gives: `DataFreeViTQuantizer.from_pretrained(source).quantize(config=config)`."""
    return DataFreeViTQuantizer.from_pretrained(source, **kwargs).quantize(config=config)


def saved(model, folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """`model.save_pretrained(folder)`'s config.json, tensors and safetensors metadata."""
    model.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        tensors = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118 - safe_open has no iteration
        metadata = weights.metadata()
    return json.loads((folder / "config.json").read_text()), tensors, metadata


def assert_same_checkpoint(model, expected, tmp_path: Path) -> None:
    config, tensors, metadata = saved(model, tmp_path / "loaded")
    expected_config, expected_tensors, expected_metadata = saved(expected, tmp_path / "expected")
    assert config == expected_config
    assert metadata == expected_metadata
    assert tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(tensors[key], expected_tensors[key]) for key in tensors)


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory, image_processor) -> Path:
    """A tiny float ViT saved with its image processor."""
    return save_float_model(tmp_path_factory.mktemp("float-vit"), image_processor)


@pytest.fixture(scope="module")
def loaded(float_folder):
    """The float folder quantized inside from_pretrained with the optimising synthesizer, and its reference."""
    model = AutoModelForImageClassification.from_pretrained(float_folder, quantization_config=SYNTHESIS)
    return model, reference(float_folder, SYNTHESIS)


def test_from_pretrained_returns_the_model_quantize_returns(loaded, pixels, tmp_path):
    from optimum_dfq.hub import write_repo_extras

    model, expected = loaded
    assert isinstance(model.hf_quantizer, DFQHfQuantizer) and model.hf_quantizer.plan is not None
    assert model.is_quantized and model.config.quantization_config == expected.config.quantization_config
    assert model.config.quantization_config.input_range == "pixels"  # resolved from the folder's image processor
    assert model.hf_quantizer.provenance == expected.hf_quantizer.provenance
    assert model.hf_quantizer.image_processor.to_dict() == expected.hf_quantizer.image_processor.to_dict()
    assert torch.equal(logits(model, pixels[0]), logits(expected, pixels[0]))
    assert_same_checkpoint(model, expected, tmp_path)
    for quantized, folder in ((model, tmp_path / "loaded"), (expected, tmp_path / "expected")):
        write_repo_extras(quantized, folder, "org/tiny-vit-w4a4")  # what push_to_hub uploads beside the weights
    for name in ("README.md", "preprocessor_config.json"):
        assert (tmp_path / "loaded" / name).read_text() == (tmp_path / "expected" / name).read_text()


def test_the_result_saves_reloads_and_refuses_dequantize_like_a_quantize_result(loaded, pixels, tmp_path):
    model, _ = loaded
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)  # no quantization_config needed
    assert reloaded.hf_quantizer.pre_quantized
    assert torch.equal(logits(reloaded, pixels[0]), logits(model, pixels[0]))
    with pytest.raises(NotImplementedError, match="cannot be dequantized"):
        model.dequantize()


def test_quantize_sees_the_float_model_that_data_free_vit_quantizer_loads(float_folder, monkeypatch):
    seen, quantize = [], DataFreeViTQuantizer.quantize

    def recording(self, model=None, *args, **kwargs):
        model = model if model is not None else self.model
        seen.append({"attention": model.config._attn_implementation, "config": model.config.to_diff_dict(),
                     "quantizer": getattr(model, "hf_quantizer", None), "marked": getattr(model, "is_quantized", None),
                     "dtypes": {p.dtype for p in model.parameters()}})
        return quantize(self, model, *args, **kwargs)

    monkeypatch.setattr(DataFreeViTQuantizer, "quantize", recording)
    AutoModelForImageClassification.from_pretrained(float_folder, quantization_config=NOISE)
    reference(float_folder, NOISE)
    assert seen[0]["quantizer"] is None and "quantization_config" not in seen[0]["config"]
    assert seen[0] == seen[1]


def test_synthesis_shares_the_cache_entry_of_quantize(float_folder, default_synthesis_cache, count_optimised_batches):
    # the float model's config must not carry the quantization_config transformers put on it: the cache key hashes it
    AutoModelForImageClassification.from_pretrained(float_folder, quantization_config=SYNTHESIS)
    assert len(list(default_synthesis_cache.glob("*/calibration_set"))) == 1
    optimised = count_optimised_batches()
    reference(float_folder, SYNTHESIS)
    assert optimised == [] and len(list(default_synthesis_cache.glob("*/calibration_set"))) == 1


def test_a_dict_config_is_read_as_a_dfq_config(float_folder, pixels):
    as_dict = {"quant_method": "optimum_dfq", "bits": "w4a4", "synthesizer": "gaussian", "num_images": 4}
    model = AutoModelForImageClassification.from_pretrained(float_folder, quantization_config=as_dict)
    expected = reference(float_folder, NOISE)
    assert isinstance(model.config.quantization_config, DFQConfig)
    assert model.config.quantization_config == expected.config.quantization_config
    assert torch.equal(logits(model, pixels[0]), logits(expected, pixels[0]))


def test_a_config_naming_a_calibration_dataset_calibrates_on_it(float_folder, pixels):
    config = DFQConfig(bits="w8a8", num_images=4,
                       calibration_dataset={"path": str(FIXTURES / "cifar10_tiny_train.parquet")})
    model = AutoModelForImageClassification.from_pretrained(float_folder, quantization_config=config)
    expected = reference(float_folder, config)
    assert model.hf_quantizer.provenance["calibration"]["source"] == "real"
    assert torch.equal(logits(model, pixels[0]), logits(expected, pixels[0]))


def test_a_folder_without_image_processor_is_quantized_as_quantize_does(tmp_path, pixels, caplog):
    folder = save_float_model(tmp_path / "bare")
    with caplog.at_level("WARNING", logger="optimum_dfq"):
        model = AutoModelForImageClassification.from_pretrained(folder, quantization_config=NOISE)
    assert f"{folder} has no image processor" in caplog.text
    assert model.config.quantization_config.input_range == "calibrated"  # "auto" without a processor
    assert model.hf_quantizer.image_processor is None
    assert torch.equal(logits(model, pixels[0]), logits(reference(folder, NOISE), pixels[0]))
    needs_processor = NOISE.replace(input_range="pixels")
    with pytest.raises(ConfigError, match="input_range='pixels'.* builds the image-input levels"):
        AutoModelForImageClassification.from_pretrained(folder, quantization_config=needs_processor)
    with pytest.raises(ConfigError, match="input_range='pixels'.* builds the image-input levels"):
        reference(folder, needs_processor)


def test_an_unreadable_image_processor_config_is_refused(tmp_path):
    folder = save_float_model(tmp_path / "broken")
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="preprocessor_config.json cannot be read"):
        AutoModelForImageClassification.from_pretrained(folder, quantization_config=NOISE)


def test_a_subfolder_model_reads_the_image_processor_of_its_subfolder(tmp_path, image_processor):
    save_float_model(tmp_path / "repo" / "float", image_processor)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1] * 3).save_pretrained(tmp_path / "repo")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "repo", subfolder="float",
                                                            quantization_config=NOISE)
    assert list(model.hf_quantizer.image_processor.image_mean) == CIFAR_MEAN


def test_every_family_is_quantized_as_quantize_does(tiny_model, tmp_path, pixels):
    tiny_model.save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=NOISE)
    assert type(model) is type(tiny_model)
    assert torch.equal(logits(model, pixels[0]), logits(reference(tmp_path, NOISE), pixels[0]))


# ---------------------------------------------------------------------------------------------- Hub repositories
def hub_cache(root: Path, image_processors: dict[str, ViTImageProcessor | None], main: str) -> Path:
    """A Hub cache (`cache_dir`) holding `REPO` at the given commits, each with the float model and the given image
    processor (or none); `main` is the commit the `main` branch points to."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    for commit, processor in image_processors.items():
        save_float_model(repo / "snapshots" / commit, processor)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    return root


def test_a_hub_repository_reads_its_image_processor_from_the_cache_offline(tmp_path, image_processor, pixels):
    other = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2] * 3, image_std=[0.3] * 3)
    cache = hub_cache(tmp_path / "hub", {OLD_COMMIT: image_processor, COMMIT: other}, main=COMMIT)
    model = AutoModelForImageClassification.from_pretrained(REPO, cache_dir=cache, quantization_config=NOISE)
    assert list(model.hf_quantizer.image_processor.image_mean) == [0.2] * 3  # main's, from the given cache_dir
    old = AutoModelForImageClassification.from_pretrained(REPO, cache_dir=cache, revision=OLD_COMMIT,
                                                          quantization_config=NOISE)
    assert list(old.hf_quantizer.image_processor.image_mean) == CIFAR_MEAN  # the revision the weights were read at
    expected = reference(REPO, NOISE, cache_dir=cache, revision=OLD_COMMIT)
    assert old.hf_quantizer.provenance["base_model"] == REPO == expected.hf_quantizer.provenance["base_model"]
    assert torch.equal(logits(old, pixels[0]), logits(expected, pixels[0]))


def test_a_hub_repository_without_image_processor_is_quantized_without_one(tmp_path, caplog):
    cache = hub_cache(tmp_path / "hub", {COMMIT: None}, main=COMMIT)
    with caplog.at_level("WARNING", logger="optimum_dfq"):
        model = AutoModelForImageClassification.from_pretrained(REPO, cache_dir=cache, quantization_config=NOISE)
    assert f"{REPO} has no image processor" in caplog.text
    assert model.config.quantization_config.input_range == "calibrated"


# ---------------------------------------------------------------------------------------------- refusals
def test_loading_in_half_precision_is_refused(float_folder):
    with pytest.raises(ConfigError, match=r"calibrates the float model in float32.*Pass dtype=torch.float32"):
        AutoModelForImageClassification.from_pretrained(float_folder, quantization_config=NOISE,
                                                        dtype=torch.float16)


def test_a_half_precision_checkpoint_loads_in_float32_when_asked(tmp_path, pixels):
    folder = tmp_path / "half"
    tiny_vit().to(torch.float16).save_pretrained(folder)
    with pytest.raises(ConfigError, match="a checkpoint saved in half precision loads so by default"):
        AutoModelForImageClassification.from_pretrained(folder, quantization_config=NOISE)  # dtype="auto"
    model = AutoModelForImageClassification.from_pretrained(folder, quantization_config=NOISE, dtype=torch.float32)
    assert torch.equal(logits(model, pixels[0]), logits(reference(folder, NOISE), pixels[0]))


def test_an_unsupported_architecture_is_refused(float_folder):
    with pytest.raises(UnsupportedArchitectureError, match="ViTModel is not supported"):
        AutoModel.from_pretrained(float_folder, quantization_config=NOISE)


def test_a_checkpoint_without_classifier_weights_is_refused_before_loading(tmp_path, monkeypatch):
    ViTModel(tiny_vit().config).save_pretrained(tmp_path)  # a backbone: the classifier would be random
    with pytest.raises(CheckpointError, match=r"has no weights for classifier\.bias, classifier\.weight"):
        reference(tmp_path, NOISE)
    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", None)  # refused before any weight is read
    with pytest.raises(CheckpointError, match=r"has no weights for classifier\.bias, classifier\.weight"):
        AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=NOISE)


def test_a_pickled_checkpoint_without_classifier_weights_is_refused_before_quantizing(tmp_path, monkeypatch):
    # pytorch_model.bin: its names are not read before loading (that would unpickle it), so the check follows the load
    quantized = []
    monkeypatch.setattr(DataFreeViTQuantizer, "quantize", lambda self, **kwargs: quantized.append(self.model))
    for name, model in (("backbone", ViTModel(tiny_vit().config)), ("classifier", tiny_vit())):
        model.config.save_pretrained(tmp_path / name)
        torch.save(model.state_dict(), tmp_path / name / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"backbone has no weights for classifier\.bias, classifier\.weight"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "backbone", quantization_config=NOISE)
    assert quantized == []
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier", quantization_config=NOISE)
    assert quantized == [model]


def test_a_device_map_over_several_devices_is_refused():
    quantizer = DFQHfQuantizer(NOISE, pre_quantized=False)
    with pytest.raises(ConfigError, match="spreads the model over cpu, cuda:0.*Load it on one device"):
        quantizer.validate_environment(device_map={"vit": "cpu", "classifier": "cuda:0"})
    quantizer.validate_environment(device_map={"": "cpu"})
    DFQHfQuantizer(NOISE).validate_environment(device_map={"vit": "cpu", "classifier": "cuda:0"})  # loading: fine


def test_one_device_named_in_several_ways_is_one_device():
    quantizer = DFQHfQuantizer(NOISE, pre_quantized=False)
    quantizer.validate_environment(device_map={"vit.embeddings": 0, "vit.encoder": "cuda:0", "classifier": "cuda"})
    quantizer.validate_environment(device_map={"vit": torch.device("cuda", 0), "classifier": 0})
    quantizer.validate_environment(device_map={"vit": "cpu", "classifier": torch.device("cpu")})
    with pytest.raises(ConfigError, match="spreads the model over cuda:0, cuda:1"):
        quantizer.validate_environment(device_map={"vit": 0, "classifier": "cuda:1"})
    with pytest.raises(ConfigError, match="spreads the model over cpu, cuda:0"):
        quantizer.validate_environment(device_map={"vit": "cpu", "classifier": 0})


def test_a_quantized_checkpoint_keeps_its_own_config_when_one_is_passed(vit_w4a4, pixels):
    qmodel, folder = vit_w4a4
    with pytest.warns(UserWarning, match="The `quantization_config` from the model will be used"):
        model = AutoModelForImageClassification.from_pretrained(folder, quantization_config=NOISE.replace(bits="w8a8"))
    assert model.hf_quantizer.pre_quantized and model.config.quantization_config.bits == "w4a4"
    assert torch.equal(logits(model, pixels[0]), logits(qmodel, pixels[0]))

