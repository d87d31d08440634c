"""End-to-end tests of DataFreeViTQuantizer.quantize on tiny models of every supported family."""

import copy
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from optimum.quantization_base import OptimumQuantizer

from optimum_dfq import (
    BIT_PRESETS,
    BitPresetError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    DataFreeViTQuantizer,
    DFQConfig,
    ImageSizeError,
    SynthesisError,
    UnsupportedArchitectureError,
)
from optimum_dfq.calibration import iter_quantizers
from optimum_dfq.nn import QConv2d, QLayerNorm, QLinear
from optimum_dfq.quantizers import LogSqrt2Quantizer

from .conftest import FIXTURES, TINY_MODELS, tiny_vit, two_image_columns


def count_levels_ok(model) -> None:
    for name, quantizer in iter_quantizers(model):
        levels = quantizer.levels()
        per_row = levels.shape[-1]
        expected = 2**quantizer.bits + (1 if isinstance(quantizer, LogSqrt2Quantizer) else 0)
        assert per_row == expected, name
        rows = levels.reshape(-1, per_row)
        assert all(torch.unique(row).numel() == expected for row in rows), name


def test_is_an_optimum_quantizer():
    assert isinstance(DataFreeViTQuantizer(tiny_vit()), OptimumQuantizer)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("bits", sorted(BIT_PRESETS))
def test_every_preset_on_every_family_with_gaussian(family, bits):
    model = TINY_MODELS[family]()
    pixels = torch.randn(4, 3, 32, 32)
    reference = model(pixel_values=pixels)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = DataFreeViTQuantizer().quantize(model, bits=bits, synthesizer="gaussian", num_images=8)

    assert type(qmodel) is type(model)
    output = qmodel(pixel_values=pixels)
    assert type(output) is type(reference)
    assert output.logits.shape == reference.logits.shape
    assert torch.isfinite(output.logits).all()
    assert not torch.equal(output.logits, reference.logits)  # really quantized
    # input model untouched (still the FP teacher)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (QLinear, QConv2d)) for m in model.modules())
    assert torch.equal(model(pixel_values=pixels).logits, reference.logits)

    config = qmodel.config.quantization_config
    assert isinstance(config, DFQConfig) and config.bits == bits
    weight_bits, activation_bits = BIT_PRESETS[bits]
    linears = [m for m in qmodel.modules() if isinstance(m, QLinear)]
    assert linears and all(m.weight_quantizer.bits == weight_bits for m in linears)
    activation_quantizers = [q for n, q in iter_quantizers(qmodel) if not n.endswith("weight_quantizer")]
    if activation_bits is None:
        assert not activation_quantizers
    else:
        image_input = [q for n, q in iter_quantizers(qmodel) if n.endswith("projection.input_quantizer")]
        assert len(image_input) == 1 and image_input[0].bits == 8
        others = [q for q in activation_quantizers if q not in image_input]
        assert others and all(q.bits == activation_bits for q in others)
    count_levels_ok(qmodel)


def test_sites_of_the_repq_placement(tiny_model):
    qmodel = DataFreeViTQuantizer().quantize(tiny_model, bits="w4a4", synthesizer="gaussian", num_images=4)
    names = [n for n, _ in iter_quantizers(qmodel)]
    norms = [m for m in qmodel.modules() if isinstance(m, QLayerNorm)]
    assert norms and all(not m.output_quantizer.per_channel for m in norms)  # re-parameterised to per tensor
    for site in ("query", "key", "probs", "value"):
        assert any(n.endswith(f"dfq_attention.{site}") for n in names)
    assert all(isinstance(q, LogSqrt2Quantizer) for n, q in iter_quantizers(qmodel) if n.endswith(".probs"))
    # classifier(s) are quantized too, with their own per-tensor input quantizer
    classifiers = [m for n, m in qmodel.named_modules() if n.endswith("classifier") and isinstance(m, QLinear)]
    assert classifiers and all(m.input_quantizer is not None for m in classifiers)
    assert qmodel.config._attn_implementation == "optimum_dfq"


def test_real_data_calibration_w8a8_matches_fp(tiny_model, cifar_train, image_processor, cifar_test_pixels):
    quantizer = DataFreeViTQuantizer(tiny_model, image_processor)
    qmodel = quantizer.quantize(bits="w8a8", calibration_dataset=cifar_train, num_images=32)
    with torch.no_grad():
        fp = tiny_model(pixel_values=cifar_test_pixels).logits
        q = qmodel(pixel_values=cifar_test_pixels).logits
    assert F.cosine_similarity(fp.flatten(), q.flatten(), dim=0) >= 0.99
    assert F.cosine_similarity(fp, q, dim=-1).mean() >= 0.99
    count_levels_ok(qmodel)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("bits", sorted(BIT_PRESETS))
def test_every_preset_on_every_family_with_real_data(cifar_train, image_processor, family, bits):
    model = TINY_MODELS[family]()
    qmodel = DataFreeViTQuantizer(model, image_processor).quantize(bits=bits, calibration_dataset=cifar_train)
    assert qmodel.config.quantization_config.num_images == 32
    assert qmodel.config.quantization_config.bits == bits
    assert torch.isfinite(qmodel(pixel_values=torch.randn(2, 3, 32, 32)).logits).all()
    count_levels_ok(qmodel)


def test_from_pretrained_local_folder_and_instance(tmp_path, image_processor):
    model = tiny_vit()
    model.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    quantizer = DataFreeViTQuantizer.from_pretrained(str(tmp_path))
    assert type(quantizer.model) is type(model)
    assert quantizer.image_processor is not None
    torch.testing.assert_close(quantizer.model.classifier.weight, model.classifier.weight)
    assert DataFreeViTQuantizer.from_pretrained(model).model is model
    qmodel = quantizer.quantize(bits="w8a8", num_images=4, save_dir=tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists() and isinstance(qmodel, type(model))


@pytest.mark.parametrize("name", ["{tmp}/missing", "./missing", "~/surely-missing-model-folder", "models/vit/missing"])
def test_from_pretrained_names_a_missing_local_folder(name, tmp_path, monkeypatch):
    # transformers calls these malformed Hub ids ("Repo id must be in the form 'repo_name' ...")
    monkeypatch.chdir(tmp_path)
    where = re.escape(str(Path(name.format(tmp=tmp_path)).expanduser().absolute()))
    with pytest.raises(FileNotFoundError, match=f"no model folder at {where}; check the path"):
        DataFreeViTQuantizer.from_pretrained(name.format(tmp=tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no model folder at {where}; check the path"):
        DataFreeViTQuantizer.from_pretrained(Path(name.format(tmp=tmp_path)))


@pytest.mark.parametrize("name", ["org/vit", "facebook/deit-small-patch16-224"])
def test_from_pretrained_takes_a_hub_id_with_windows_separators(name, tmp_path, monkeypatch):
    # os.altsep is "/" on Windows: every Hub id was called a missing local folder there
    from optimum_dfq.hub import local_path_or_hub_id as _local_path_or_hub_id

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "sep", "\\")
    monkeypatch.setattr(os, "altsep", "/")
    assert _local_path_or_hub_id(name) == name
    with pytest.raises(FileNotFoundError, match="no model folder"):
        _local_path_or_hub_id("models\\vit")


def test_from_pretrained_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_vit().save_pretrained(tmp_path / "vit")
    quantizer = DataFreeViTQuantizer.from_pretrained("~/vit", load_image_processor=False)
    assert type(quantizer.model).__name__ == "ViTForImageClassification"


def test_seeded_runs_are_reproducible():
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32)

    def logits(seed: int) -> torch.Tensor:
        qmodel = DataFreeViTQuantizer().quantize(model, bits="w4a4", num_images=8, seed=seed, synthesizer="gaussian")
        return qmodel(pixel_values=pixels).logits

    a, b, c = logits(3), logits(3), logits(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)



def test_quantize_leaves_the_caller_s_random_state_alone():
    # quantize() seeds its own stream (config.seed); the caller's next draws must not depend on having called it
    model = tiny_vit()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DataFreeViTQuantizer().quantize(model, bits="w4a4", num_images=4, seed=7, synthesizer="gaussian")
    assert torch.equal(torch.rand(3), expected)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_quantized_as_a_float32_copy(dtype, caplog):
    pixels = torch.randn(2, 3, 32, 32)
    half = tiny_vit().to(dtype)
    upcast = copy.deepcopy(half).float()
    reference = DataFreeViTQuantizer().quantize(upcast, bits="w4a4", num_images=4, synthesizer="gaussian")
    with caplog.at_level("WARNING", logger="optimum_dfq.quantizer"):
        qmodel = DataFreeViTQuantizer().quantize(half, bits="w4a4", num_images=4, synthesizer="gaussian")
    assert "calibrated and quantized as a float32 copy" in caplog.text
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert torch.equal(qmodel(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)


def test_inplace_quantizes_the_model_itself_with_the_result_of_a_copy():
    pixels = torch.randn(2, 3, 32, 32)
    model = tiny_vit()
    copied = DataFreeViTQuantizer().quantize(model, bits="w4a4", num_images=4, synthesizer="gaussian")
    assert getattr(model, "hf_quantizer", None) is None  # the copy left it alone
    qmodel = DataFreeViTQuantizer().quantize(model, bits="w4a4", num_images=4, synthesizer="gaussian", inplace=True)
    assert qmodel is model and model.hf_quantizer is not None
    assert torch.equal(qmodel(pixel_values=pixels).logits, copied(pixel_values=pixels).logits)


def test_inplace_casts_a_half_precision_model_to_float32_in_place(caplog):
    pixels = torch.randn(2, 3, 32, 32)
    half = tiny_vit().to(torch.float16)
    reference = DataFreeViTQuantizer().quantize(half, bits="w4a4", num_images=4, synthesizer="gaussian")
    with caplog.at_level("WARNING", logger="optimum_dfq.quantizer"):
        qmodel = DataFreeViTQuantizer().quantize(half, bits="w4a4", num_images=4, synthesizer="gaussian", inplace=True)
    assert "it is cast to float32 in place, then calibrated and quantized" in caplog.text
    assert qmodel is half and half.config.dtype == torch.float32
    assert torch.equal(qmodel(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)


def test_swin_window_sizes_are_left_as_the_input_model_had_them(tmp_path):
    # transformers' Swin blocks shrink their window (and drop the shift) in place on the first forward pass whose
    # feature map is not larger than the window; calibration must not leave that behind, or the quantized model
    # predicts other logits than its reloaded checkpoint on its first input larger than the calibration images
    from transformers import AutoModelForImageClassification

    model = TINY_MODELS["swin"]()  # stage 2: a 4x4 feature map with 4x4 windows, so its shifted block clamps
    qmodel = DataFreeViTQuantizer().quantize(model, bits="w8a8", num_images=4, synthesizer="gaussian")
    qmodel.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    larger = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(qmodel(pixel_values=larger).logits, reloaded(pixel_values=larger).logits)


def test_parallel_calibration_order():
    model = tiny_vit()
    config = DFQConfig(bits="w8a8", calibration_order="parallel", calibration_batch_size=3, synthesizer="gaussian")
    qmodel = DataFreeViTQuantizer().quantize(model, config=config, num_images=8)
    pixels = torch.randn(4, 3, 32, 32)
    cosine = F.cosine_similarity(qmodel(pixel_values=pixels).logits, model(pixel_values=pixels).logits, dim=-1)
    assert cosine.mean() > 0.99


@pytest.mark.parametrize("bits,observer", [("w8a8", "minmax"), ("w4a8", "minmax"), ("w4a4", "percentile_mse")])
def test_activation_ranges_follow_the_auto_observer(bits, observer):
    from optimum_dfq.models import find_activation_consumers
    from optimum_dfq.quantizers import UniformQuantizer

    model = tiny_vit()
    post_gelu = set(find_activation_consumers(model, torch.randn(1, 3, 32, 32)))
    assert len(post_gelu) == model.config.num_hidden_layers
    qmodel = DataFreeViTQuantizer().quantize(model, bits=bits, num_images=4, synthesizer="gaussian")
    weights = {name for name, _ in iter_quantizers(qmodel) if name.endswith("weight_quantizer")}
    activations = {name: q for name, q in iter_quantizers(qmodel)
                   if name not in weights and isinstance(q, UniformQuantizer)}
    after_gelu = {name for name in activations if name.rpartition(".")[0] in post_gelu}
    assert len(after_gelu) == len(post_gelu)
    assert len(activations) - len(after_gelu) > 10
    assert {q.observer for name, q in activations.items() if name not in after_gelu} == {observer}
    # fc2's post-GELU input keeps percentile-MSE at every width (DFQConfig.post_activation_range_observer)
    assert {activations[name].observer for name in after_gelu} == {"percentile_mse"}
    explicit = DataFreeViTQuantizer().quantize(model, config=DFQConfig(bits=bits, activation_observer="minmax"),
                                               num_images=4, synthesizer="gaussian")
    assert {q.observer for name, q in iter_quantizers(explicit)
            if isinstance(q, UniformQuantizer) and not name.endswith("weight_quantizer")} == {"minmax"}


def test_quantizer_options_of_the_config_reach_every_quantizer():
    from optimum_dfq.quantizers import Log2Quantizer, UniformQuantizer

    config = DFQConfig(bits="w4a4", weight_symmetric=True, weight_observer="minmax", weight_percentiles=[0.99, 0.995],
                       activation_percentiles=[0.98, 0.999], post_softmax="log2", input_bits=6,
                       input_range="calibrated", synthesizer="gaussian")
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), config=config, num_images=4)
    quantizers = dict(iter_quantizers(qmodel))
    weights = {n: q for n, q in quantizers.items() if n.endswith("weight_quantizer")}
    probs = {n: q for n, q in quantizers.items() if n.endswith("dfq_attention.probs")}
    others = {n: q for n, q in quantizers.items() if n not in weights and n not in probs}
    assert weights and probs and others
    for q in weights.values():
        assert (q.bits, q.symmetric, q.observer, q.percentiles) == (4, True, "minmax", [0.99, 0.995])
        assert bool((q.zero_point == 8).all())  # symmetric: the zero point is 2^(b-1)
    assert all(isinstance(q, Log2Quantizer) and q.percentiles == [0.98, 0.999] for q in probs.values())
    assert all(isinstance(q, UniformQuantizer) and q.percentiles == [0.98, 0.999] for q in others.values())
    assert quantizers["vit.embeddings.patch_embeddings.projection.input_quantizer"].bits == 6  # the image input
    assert {q.bits for n, q in others.items() if "patch_embeddings" not in n} == {4}


def test_parallel_calibration_runs_in_batches_of_calibration_batch_size():
    # ("sequential" order runs the whole set in one pass, by design: each quantizer calibrates as data reaches it)
    sizes = []

    def record(module, args):  # every forward of any copy of the model, whatever quantize() works on
        if type(module).__name__ == "ViTEmbeddings":
            sizes.append(args[0].shape[0])

    config = DFQConfig(bits="w4a4", calibration_order="parallel", calibration_batch_size=3, synthesizer="gaussian")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        DataFreeViTQuantizer().quantize(tiny_vit(), config=config, num_images=8)
    finally:
        handle.remove()
    assert sorted(size for size in sizes if size > 1) == [2, 3, 3]  # 8 images: 3, 3, 2 (probes use 1 image)


@pytest.mark.parametrize("mode", ["per_channel_reparam", "per_tensor", "per_channel"])
def test_post_layernorm_mode_sets_the_quantizer_granularity_and_round_trips(mode, tmp_path):
    from transformers import AutoModelForImageClassification

    model = tiny_vit()
    config = DFQConfig(bits="w4a4", post_layernorm=mode, synthesizer="gaussian")
    qmodel = DataFreeViTQuantizer().quantize(model, config=config, num_images=4)
    norms = {name: m for name, m in qmodel.named_modules() if isinstance(m, QLayerNorm)}
    assert norms
    for name, norm in norms.items():
        assert norm.output_quantizer.per_channel == (mode == "per_channel"), name
        # only the re-parameterisation rescales the LayerNorm's affine parameters
        unchanged = torch.equal(norm.weight, model.get_submodule(name).weight)
        assert unchanged == (mode != "per_channel_reparam"), name
    qmodel.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, qmodel(pixel_values=pixels).logits)


def test_modules_to_not_convert():
    model = tiny_vit()
    config = DFQConfig(bits="w4a4", synthesizer="gaussian",
                       modules_to_not_convert=["classifier", "re:.*layers\\.0\\.mlp\\.fc1"])
    qmodel = DataFreeViTQuantizer().quantize(model, config=config, num_images=4)
    assert type(qmodel.classifier) is torch.nn.Linear
    assert type(qmodel.vit.layers[0].mlp.fc1) is torch.nn.Linear
    assert type(qmodel.vit.layers[0].layernorm_after) is torch.nn.LayerNorm  # its only consumer stays float
    assert isinstance(qmodel.vit.layers[1].mlp.fc1, QLinear)


@pytest.mark.parametrize("entry", ["vit.layers.0", "vit.encoder.layer.0.output.dense", "re:.*query"])
def test_modules_to_not_convert_entry_that_matches_nothing_is_refused(entry):
    config = DFQConfig(bits="w4a4", synthesizer="gaussian", modules_to_not_convert=["classifier", entry])
    with pytest.raises(ConfigError, match=rf"entries \['{re.escape(entry)}'\] match no .*'re:'"):
        DataFreeViTQuantizer().quantize(tiny_vit(), config=config, num_images=2)


def test_modules_to_not_convert_accepts_layernorm_and_attention_names():
    config = DFQConfig(bits="w4a4", synthesizer="gaussian",
                       modules_to_not_convert=["vit.layers.0.layernorm_before", "vit.layers.1.attention"])
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), config=config, num_images=2)
    assert type(qmodel.vit.layers[0].layernorm_before) is torch.nn.LayerNorm
    assert "vit.layers.1.attention" in qmodel.hf_quantizer.plan.skipped


# ---------------------------------------------------------------------- errors
def test_unknown_preset():
    with pytest.raises(BitPresetError, match="Unknown bit preset 'w4x4'"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w4x4")


def test_bits_out_of_range():
    with pytest.raises(BitPresetError, match="outside 2..8"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w12a12")


def test_unsupported_architecture():
    from transformers import ResNetConfig, ResNetForImageClassification

    with pytest.raises(UnsupportedArchitectureError, match="Supported architectures"):
        DataFreeViTQuantizer().quantize(ResNetForImageClassification(ResNetConfig()), bits="w8a8")


@pytest.mark.parametrize("config_class", ["BertConfig", "ResNetConfig"])
def test_a_checkpoint_of_another_architecture_is_refused_before_loading_weights(config_class, tmp_path):
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)  # config only: no weights are needed to refuse
    with pytest.raises(UnsupportedArchitectureError, match=rf"is a {config_class} .*only these architectures: "
                                                           r".*SwinForImageClassification.*ViTForImageClassification"):
        DataFreeViTQuantizer.from_pretrained(tmp_path)


def test_from_pretrained_checks_the_config_it_is_given(tmp_path):
    from transformers import BertConfig

    model = tiny_vit()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()  # weights only: the config comes from config=, as in transformers
    loaded = DataFreeViTQuantizer.from_pretrained(tmp_path, config=model.config).model
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    with pytest.raises(UnsupportedArchitectureError, match="is a BertConfig"):
        DataFreeViTQuantizer.from_pretrained(tmp_path, config=BertConfig())


def test_from_pretrained_refuses_a_checkpoint_without_a_classifier_head(tmp_path):
    from transformers import ViTModel

    # a backbone checkpoint (e.g. an in21k pre-training one): transformers fills the classifier with random weights
    # and only prints a load report; quantizing it gave a saved, "successful" model that predicts noise
    ViTModel(tiny_vit().config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"has no weights for classifier\.bias, classifier\.weight .*at random"
                                              r".*fine-tuned for image classification"):
        DataFreeViTQuantizer.from_pretrained(tmp_path)


def test_only_missing_parameters_are_refused_not_missing_buffers():
    from optimum_dfq.quantizer import _check_no_missing_weights

    model = tiny_vit()
    model.vit.register_buffer("position_index", torch.arange(4))  # like Swin's index buffers: built from the config
    _check_no_missing_weights("ckpt", model, ["vit.position_index"])
    with pytest.raises(CheckpointError, match=r"ckpt has no weights for vit\.layernorm\.weight "):
        _check_no_missing_weights("ckpt", model, ["vit.position_index", "vit.layernorm.weight"])


def test_from_pretrained_names_a_corrupt_weights_file(tmp_path):
    tiny_vit().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted copy or download
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated .*force_download=True"):
        DataFreeViTQuantizer.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_file_and_a_folder_without_config_json(tmp_path):
    tiny_vit().save_pretrained(tmp_path)
    # a file reached torch.load (an UnpicklingError about weights_only), a folder without config.json got
    # transformers' "Should have a `model_type` key in its config.json"
    with pytest.raises(NotADirectoryError, match=r"config.json is a file; pass the model folder .* instead \(here: "
                                                 f"{re.escape(str(tmp_path))}\\)"):
        DataFreeViTQuantizer.from_pretrained(tmp_path / "config.json")
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no config.json, so it is not a model folder"):
        DataFreeViTQuantizer.from_pretrained(tmp_path)


def test_from_pretrained_looks_for_config_json_in_the_subfolder(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "float")  # nothing but the subfolder at the top
    quantizer = DataFreeViTQuantizer.from_pretrained(tmp_path, subfolder="float", load_image_processor=False)
    assert type(quantizer.model).__name__ == "ViTForImageClassification"
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'other'))} holds no config.json"):
        DataFreeViTQuantizer.from_pretrained(tmp_path, subfolder="other")


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_that_torch_or_numpy_cannot_take_is_refused_with_the_range(seed, cifar_train, image_processor):
    # -1 reached numpy's shuffle ("expected non-negative integer"), 2**64 torch.manual_seed ("Overflow when unpacking
    # long long")
    quantizer = DataFreeViTQuantizer(tiny_vit(), image_processor)
    with pytest.raises(ConfigError, match=rf"seed={seed} is outside 0\.\.2\*\*64 - 1"):
        quantizer.quantize(bits="w8a8", calibration_dataset=cifar_train, num_images=4, seed=seed)
    with pytest.raises(ConfigError, match=rf"seed={seed} is outside"):
        quantizer.quantize(config=DFQConfig(bits="w8a8", seed=seed, synthesizer="gaussian", num_images=2))


@pytest.mark.parametrize("where", ["constructor", "quantize"])
def test_an_image_processor_given_as_a_path_names_the_loader(where, cifar_train, tmp_path):
    # a path or Hub id where the processor object belongs: "'str' object is not callable" from inside preprocessing
    # (real data) or "The image processor str has no image_mean/image_std" (synthesis)
    quantizer = DataFreeViTQuantizer(tiny_vit(), str(tmp_path) if where == "constructor" else None)
    given = {"image_processor": tmp_path} if where == "quantize" else {}
    for data in ({"calibration_dataset": cifar_train, "num_images": 2}, {}):
        with pytest.raises(ConfigError, match=r"image_processor must be an image processor, got (str|PosixPath) "
                                              r".*AutoImageProcessor\.from_pretrained\("):
            quantizer.quantize(bits="w8a8", **data, **given)


def test_save_dir_holding_the_float_model_is_refused_before_synthesis(tmp_path, monkeypatch):
    # save_pretrained replaced the float checkpoint (config.json and model.safetensors) by the quantized one without a
    # word; the CLI refuses any non-empty OUTPUT_DIR, the API did not check at all
    from optimum_dfq.synthesis import gaussian

    tiny_vit().save_pretrained(tmp_path / "float")
    weights = (tmp_path / "float" / "model.safetensors").read_bytes()
    quantizer = DataFreeViTQuantizer.from_pretrained(tmp_path / "float")
    original_synthesize = gaussian.GaussianSynthesizer.synthesize
    monkeypatch.setattr(gaussian.GaussianSynthesizer, "synthesize", None)  # refused before any image is made
    with pytest.raises(ConfigError, match=r"save_dir .*float holds a model that is not a quantized one .*overwrite"):
        quantizer.quantize(bits="w8a8", synthesizer="gaussian", num_images=2, save_dir=tmp_path / "float")
    assert (tmp_path / "float" / "model.safetensors").read_bytes() == weights
    monkeypatch.setattr(gaussian.GaussianSynthesizer, "synthesize", original_synthesize)
    for _ in range(2):  # a run saved again over its own earlier output is fine
        quantizer.quantize(bits="w8a8", synthesizer="gaussian", num_images=2, save_dir=tmp_path / "quantized")
    # transformers' save_pretrained only logs an error for a file and returns: nothing was saved
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"save_dir .*file is a file"):
        quantizer.quantize(bits="w8a8", synthesizer="gaussian", num_images=2, save_dir=tmp_path / "file")


def test_image_size_mismatch():
    with pytest.raises(ImageSizeError, match=r"\(3, 64, 64\).*expects \(3, 32, 32\)"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=torch.randn(4, 3, 64, 64))


def test_an_image_processor_of_another_size_is_refused_before_synthesis(monkeypatch, tmp_path):
    from transformers import ViTImageProcessor

    from optimum_dfq.synthesis import pixel_synthesizer

    monkeypatch.setattr(pixel_synthesizer, "optimize_batch", None)  # refused before any image is synthesized
    wrong = ViTImageProcessor(size={"height": 64, "width": 64})
    with pytest.raises(ImageSizeError, match=r"resizes every image to 64x64 .* the model takes 32x32"):
        DataFreeViTQuantizer(image_processor=wrong).quantize(tiny_vit(), bits="w8a8", save_dir=tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    unresized = ViTImageProcessor(do_resize=False)  # keeps each image's size: nothing to judge, accepted
    qmodel = DataFreeViTQuantizer(image_processor=unresized).quantize(
        tiny_vit(), bits="w8a8", calibration_dataset=torch.randn(2, 3, 32, 32))
    assert qmodel.config.quantization_config.bits == "w8a8"


def test_empty_calibration_set(cifar_train, image_processor):
    with pytest.raises(CalibrationError, match="empty"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=torch.empty(0, 3, 32, 32))
    with pytest.raises(CalibrationError, match="empty"):
        DataFreeViTQuantizer(image_processor=image_processor).quantize(
            tiny_vit(), bits="w8a8", calibration_dataset=cifar_train.select([])
        )


def test_dataset_smaller_than_num_images(cifar_train, image_processor):
    with pytest.raises(CalibrationError, match="only 64"):
        DataFreeViTQuantizer(image_processor=image_processor).quantize(
            tiny_vit(), bits="w8a8", calibration_dataset=cifar_train, num_images=100
        )


def test_real_dataset_without_image_processor(cifar_train):
    with pytest.raises(CalibrationError, match="image processor"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=cifar_train)


def test_images_on_which_the_float_model_is_not_finite_are_refused_before_layer_matching():
    huge = torch.randn(4, 3, 32, 32) * 1e20  # not processor output: the float model overflows to NaN on them
    with pytest.raises(CalibrationError, match=r"NaN or inf on the first calibration image .*image processor"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w4a4", calibration_dataset=huge)


def test_nan_in_calibration_images():
    pixels = torch.randn(4, 3, 32, 32)
    pixels[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or inf"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=pixels)


def test_inf_in_calibration_activations():
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layers[1].layernorm_after.bias.fill_(3e38)  # finite weights whose activations overflow
    with pytest.raises(CalibrationError, match=r"NaN or inf on the first calibration image \(first at "
                                               r"vit\.layernorm's output"):  # the residual sum overflows
        DataFreeViTQuantizer().quantize(model, bits="w8a8", synthesizer="gaussian", num_images=4)
    images = torch.randn(4, 3, 32, 32)
    images[1:] *= 1e20  # the first image, which layer matching runs on, is fine; the others overflow
    with pytest.raises(CalibrationError, match=r"non-finite value\(s\) \(NaN/inf\) reached the quantizer at"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=images)


def test_non_finite_weights_are_refused_before_synthesis(caplog):
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layers[0].mlp.fc1.weight[0, 0] = float("nan")
    with caplog.at_level("WARNING"), pytest.raises(CalibrationError, match=r"parameter vit\.layers\.0\.mlp\.fc1"
                                                                      r"\.weight holds NaN or inf"):
        DataFreeViTQuantizer().quantize(model, bits="w8a8", synthesizer="psaq", num_images=2)
    assert "synthesis" not in caplog.text and "No Linear" not in caplog.text


def test_unknown_synthesizer():
    with pytest.raises(SynthesisError, match="Unknown synthesizer 'dreams'.*gaussian"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", synthesizer="dreams")


def test_no_model():
    with pytest.raises(ValueError, match="No model to quantize"):
        DataFreeViTQuantizer().quantize(bits="w8a8")


def test_saved_synthetic_set_is_reusable_as_calibration_dataset(image_processor, tmp_path):
    from optimum_dfq.synthesis import calibration_set_to_dataset

    model = tiny_vit()
    config = DFQConfig(bits="w4a4", synthesizer="psaq", num_images=4,
                       synthesizer_kwargs={"iterations": [2, 2], "warmup": 1})
    quantizer = DataFreeViTQuantizer(model, image_processor)
    direct = quantizer.quantize(config=config, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # the synthesis cache entry
    calibration = quantizer.calibration_set(model, config, None, image_processor, cache_dir=tmp_path)  # reused
    reused = quantizer.quantize(config=config, calibration_dataset=calibration_set_to_dataset(calibration))
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(direct(pixel_values=pixels).logits, reused(pixel_values=pixels).logits)


def test_cache_dir_needs_a_caching_synthesizer(tmp_path):
    with pytest.raises(ValueError, match="has no cache"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", synthesizer="gaussian", num_images=2,
                                        cache_dir=tmp_path)
    for keep_nothing in (None, False):  # the default cache, or none: both fine for noise, which is never cached
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", synthesizer="gaussian", num_images=2,
                                        cache_dir=keep_nothing)


def test_cache_dir_with_real_data_is_refused(tmp_path, cifar_train, image_processor):
    with pytest.raises(ValueError, match="keeps synthesized images, but this run calibrates on real data"):
        DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(bits="w8a8", num_images=2,
                                                                   calibration_dataset=cifar_train, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # a run would be tmp_path/<key>: tmp_path/synthesis never existed


def test_quantize_synthesizes_into_the_default_cache(default_synthesis_cache, image_processor,
                                                     count_optimised_batches):
    config = DFQConfig(bits="w4a4", synthesizer="psaq", num_images=2,
                       synthesizer_kwargs={"iterations": [2, 2], "warmup": 1})
    quantizer = DataFreeViTQuantizer(tiny_vit(), image_processor)
    first = quantizer.quantize(config=config)
    assert len(list(default_synthesis_cache.glob("*/calibration_set"))) == 1
    optimised = count_optimised_batches()
    again = quantizer.quantize(config=config)  # the cached set: nothing optimised
    assert optimised == []
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(first(pixel_values=pixels).logits, again(pixel_values=pixels).logits)
    quantizer.quantize(config=config, cache_dir=False)  # synthesizes again
    assert optimised == [1]


REFERENCE_MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


@pytest.fixture(scope="module")
def cifar_test_500():
    """The 500 real CIFAR-10 test images the main job evaluates on (never used for calibration)."""
    from datasets import load_dataset

    path = REFERENCE_MODELS.parent / "data" / "cifar10_test_500.parquet"
    return load_dataset("parquet", data_files={"test": str(path)}, split="test")


@pytest.mark.parametrize("name", ["vit-cifar10", "deit-cifar10", "swin-cifar10"])
def test_reference_model_w8a8_agrees_with_fp(name, cifar_train, cifar_test_500):
    """On the trained reference models, W8A8 calibrated on the 64 real images of the fixture pool keeps >= 99% top-1
    agreement with the float model on 500 test images (issue #2). Measured on 500 rather than 256 images: one flip in
    256 is 0.39 points, and the float rounding of another CPU's kernels (AVX2 instead of AVX-512) flips a borderline
    image or two (Swin: 3 of 256 there). `benchmarks/results/w8a8_agreement.md` lists draws on 2000 test images."""
    quantizer = DataFreeViTQuantizer.from_pretrained(str(REFERENCE_MODELS / name))
    pixels = quantizer.image_processor(images=[im.convert("RGB") for im in cifar_test_500["img"]],
                                       return_tensors="pt")["pixel_values"]
    qmodel = quantizer.quantize(bits="w8a8", calibration_dataset=cifar_train, num_images=len(cifar_train))
    config = qmodel.config.quantization_config
    assert (config.input_range, config.post_softmax_quantizer, config.num_images) == ("pixels", "tanq", 64)
    assert (config.activation_range_observer, config.post_activation_range_observer) == ("minmax", "percentile_mse")
    with torch.no_grad():
        fp = quantizer.model(pixel_values=pixels).logits.argmax(-1)
        q = qmodel(pixel_values=pixels).logits.argmax(-1)
    assert len(pixels) == 500
    assert (fp == q).float().mean() >= 0.99


def test_default_synthesizer_without_image_processor_names_the_fix():
    assert DFQConfig().synthesizer != "gaussian"  # the default optimises pixels, so it needs the model's pixel range
    with pytest.raises(SynthesisError, match="image_processor=AutoImageProcessor.from_pretrained"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", num_images=2)


def test_from_pretrained_folder_without_image_processor_warns_with_the_fix(tmp_path, caplog):
    tiny_vit().save_pretrained(tmp_path)  # no preprocessor_config.json
    with caplog.at_level("WARNING", logger="optimum_dfq.quantizer"):
        quantizer = DataFreeViTQuantizer.from_pretrained(str(tmp_path))
    assert quantizer.model is not None and quantizer.image_processor is None
    assert "has no image processor; pass image_processor= for real-data calibration" in caplog.text


def test_a_corrupt_image_processor_file_is_named_not_taken_for_a_missing_one(tmp_path, image_processor):
    # it was reported as "has no image processor" and the run went on without one: input_range "auto" then resolves
    # to "calibrated" instead of "pixels", and the default synthesizer asks for a processor the folder has
    tiny_vit().save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    config = tmp_path / "preprocessor_config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json cannot be read .*"
                                              r"image_processor\.save_pretrained"):
        DataFreeViTQuantizer.from_pretrained(tmp_path)


def test_config_must_be_a_dfqconfig():
    with pytest.raises(ConfigError, match=r"config must be a DFQConfig, got dict.*DFQConfig\.from_dict"):
        DataFreeViTQuantizer().quantize(tiny_vit(), config={"bits": "w8a8"})


def test_calibration_dataset_from_the_config_is_loaded(image_processor):
    model = tiny_vit()
    spec = {"path": str(FIXTURES / "cifar10_tiny_train.parquet"), "split": "train"}
    config = DFQConfig(bits="w8a8", num_images=5, seed=2, calibration_dataset=spec)
    calibration = DataFreeViTQuantizer.calibration_set(model, config, None, image_processor)
    assert calibration.metadata == {"source": "real", "num_images": 5, "seed": 2}
    assert calibration.pixel_values.shape == (5, 3, 32, 32) and calibration.labels.shape == (5,)


def test_the_chosen_image_column_is_calibrated_on_and_recorded_with_the_configs_dataset(cifar_train, image_processor,
                                                                                     tmp_path):
    # a dataset with several Image columns was calibrated on its first one without a word
    model, pairs = tiny_vit(), two_image_columns(cifar_train.select(range(6)))
    quantizer = DataFreeViTQuantizer(model, image_processor)
    with pytest.raises(CalibrationError, match=r"several image columns \['img', 'other'\].*image_column='img'"):
        quantizer.quantize(bits="w8a8", calibration_dataset=pairs, num_images=4)

    def calibrated(config, **columns):
        return DataFreeViTQuantizer.calibration_set(model, config, None, image_processor, **columns).pixel_values

    pairs.save_to_disk(str(tmp_path / "pairs"))
    config = DFQConfig(bits="w8a8", num_images=6, calibration_dataset={"path": str(tmp_path / "pairs")})
    named = config.replace(calibration_dataset={**config.calibration_dataset, "image_column": "other"})
    torch.testing.assert_close(calibrated(config, image_column="other"), calibrated(named))
    assert not torch.equal(calibrated(config, image_column="img"), calibrated(named))  # the choice is what is read

    qmodel = quantizer.quantize(config=config, image_column="other", label_column="label")
    assert qmodel.config.quantization_config.calibration_dataset == {
        "path": str(tmp_path / "pairs"), "image_column": "other", "label_column": "label"}
    reloaded = DFQConfig.from_dict(qmodel.config.quantization_config.to_dict())
    assert reloaded.calibration_dataset["image_column"] == "other"
    given = quantizer.quantize(bits="w8a8", calibration_dataset=pairs, num_images=4, image_column="other")
    assert given.config.quantization_config.calibration_dataset == {}  # a dataset object: nothing to record


@pytest.mark.parametrize("data, source", [({"synthesizer": "gaussian"}, "synthesized"),
                                          ({"calibration_dataset": torch.randn(2, 3, 32, 32)}, "given as a Tensor")])
def test_a_column_choice_without_an_image_dataset_is_refused(data, source, image_processor):
    quantizer = DataFreeViTQuantizer(tiny_vit(), image_processor)
    with pytest.raises(ConfigError, match=rf"image_column='img' would not be used: the calibration images are "
                                          rf"{source}"):
        quantizer.quantize(bits="w8a8", image_column="img", **data)


def test_calibration_set_is_used_as_given_and_checked_against_the_model():
    from optimum_dfq.calibration import CalibrationSet

    model, config = tiny_vit(), DFQConfig(bits="w8a8")
    given = CalibrationSet(torch.randn(2, 3, 32, 32), metadata={"source": "mine"})
    assert DataFreeViTQuantizer.calibration_set(model, config, given, None) is given
    with pytest.raises(ImageSizeError, match=r"\(3, 16, 16\).*expects \(3, 32, 32\)"):
        DataFreeViTQuantizer.calibration_set(model, config, CalibrationSet(torch.randn(2, 3, 16, 16)), None)


def test_unsupported_calibration_dataset_type_names_the_accepted_ones():
    with pytest.raises(CalibrationError,
                       match="must be a datasets.Dataset, a CalibrationSet or a pixel tensor, got list"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=[torch.randn(3, 32, 32)])


def test_a_dataset_dict_names_its_splits_and_how_to_pick_one(cifar_train, image_processor):
    # load_dataset(...) without split= returns a DatasetDict: "got DatasetDict" did not say what to pass instead
    from datasets import DatasetDict

    splits = DatasetDict({"train": cifar_train, "test": cifar_train})
    with pytest.raises(CalibrationError, match=r"DatasetDict with splits \['train', 'test'\]; pass one split, e\.g\. "
                                               r"calibration_dataset=dataset\['train'\]"):
        DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(bits="w8a8", calibration_dataset=splits,
                                                                   num_images=2)


def test_integer_pixel_tensor_is_refused_with_the_fix():
    raw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(CalibrationError, match=r"dtype torch\.uint8.*normalised.*image_processor\(images"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=raw)


def test_raw_pixels_cast_to_float_are_refused_like_integer_ones(image_processor):
    # torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() passed the uint8 refusal and was calibrated on
    # as if it were normalised pixel values, without a word
    from transformers import ViTImageProcessor

    from optimum_dfq import CalibrationSet

    raw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).float()
    for given in (raw, CalibrationSet(pixel_values=raw)):
        for processor in (None, image_processor):
            with pytest.raises(CalibrationError, match=r"whole numbers from \d+ to \d+: raw pixels cast to float.*"
                                                       r"image_processor\(images"):
                DataFreeViTQuantizer(image_processor=processor).quantize(tiny_vit(), bits="w8a8",
                                                                         calibration_dataset=given)
    # a processor that does not rescale makes whole numbers itself: its model takes them
    unscaled = ViTImageProcessor(size={"height": 32, "width": 32}, do_rescale=False, do_normalize=False)
    qmodel = DataFreeViTQuantizer(image_processor=unscaled).quantize(tiny_vit(), bits="w8a8", calibration_dataset=raw)
    assert qmodel.config.quantization_config.num_images == 4


def test_raw_pixels_resized_as_floats_are_refused_by_the_processor_range(image_processor):
    # raw images resized as floats are not whole numbers, and passed the check above
    from transformers import ViTImageProcessor

    raw = torch.rand(4, 3, 32, 32) * 255
    with pytest.raises(CalibrationError, match=r"run from .* but the image processor's rescaling and normalisation "
                                               r"produce at most 2\.13: raw pixels.*image_processor\(images"):
        DataFreeViTQuantizer(image_processor=image_processor).quantize(tiny_vit(), bits="w8a8", calibration_dataset=raw)
    unnormalised = ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=False)
    with pytest.raises(CalibrationError, match=r"produce at most 1: raw pixels"):
        DataFreeViTQuantizer(image_processor=unnormalised).quantize(tiny_vit(), bits="w8a8", calibration_dataset=raw)
    imagenet = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225])
    with pytest.raises(CalibrationError, match=r"produce at most 2\.64: raw pixels"):
        DataFreeViTQuantizer(image_processor=imagenet).quantize(tiny_vit(), bits="w8a8", calibration_dataset=raw / 20)
    # within the processor's range, or with negative values (Gaussian noise beyond that range), the pixels pass
    for pixels in (raw / 255 * 2.6, torch.randn(4, 3, 32, 32) * 3):
        qmodel = DataFreeViTQuantizer(image_processor=imagenet).quantize(tiny_vit(), bits="w8a8",
                                                                         calibration_dataset=pixels)
        assert qmodel.config.quantization_config.num_images == 4


def test_given_pixel_tensor_is_used_whole_and_its_size_recorded(caplog):
    pixels = torch.randn(6, 3, 32, 32)
    with caplog.at_level("INFO", logger="optimum_dfq.quantizer"):
        qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=pixels)
    assert qmodel.config.quantization_config.num_images == 6
    assert "all 6 images" in caplog.text
    with pytest.raises(ConfigError, match=r"num_images=4 but the given calibration_dataset holds 6 images"):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=pixels, num_images=4)
    explicit = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=pixels, num_images=6)
    assert torch.equal(explicit(pixel_values=pixels).logits, qmodel(pixel_values=pixels).logits)


def test_streaming_calibration_dataset_is_refused_with_the_fix(cifar_train, image_processor):
    with pytest.raises(CalibrationError, match=r"streaming .*Dataset\.from_list\(list\(dataset\.take\(n\)\)\)"):
        DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(
            bits="w8a8", calibration_dataset=cifar_train.to_iterable_dataset(), num_images=4)


def test_grayscale_model_calibrates_on_real_images(cifar_train):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10,
                                                num_channels=1)).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5], image_std=[0.5])
    qmodel = DataFreeViTQuantizer(model, processor).quantize(bits="w8a8", calibration_dataset=cifar_train,
                                                            num_images=8)
    pixels = processor(images=[im.convert("L") for im in cifar_train["img"][:4]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        error = F.mse_loss(qmodel(pixel_values=pixels).logits, model(pixel_values=pixels).logits).item()
    assert error < 1e-2


def test_activation_options_of_a_weight_only_preset_are_named_as_unused(caplog):
    config = DFQConfig(bits="w4a16", post_softmax="tanq", scale_selector="median", synthesizer="gaussian",
                       num_images=2)
    with caplog.at_level("WARNING", logger="optimum_dfq.quantizer"):
        DataFreeViTQuantizer().quantize(tiny_vit(), config=config)
    assert "scale_selector='median', post_softmax='tanq' have no effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_dfq.quantizer"):
        DataFreeViTQuantizer().quantize(tiny_vit(), config=config.replace(bits="w4a8"))
    assert "no effect" not in caplog.text


def test_explicit_synthesizer_with_real_data_is_refused(image_processor):
    pixels = torch.randn(4, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"synthesizer='psaq' would not be used: the images come from "
                                          r"calibration_dataset="):
        DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", synthesizer="psaq", calibration_dataset=pixels)
    spec = {"path": str(FIXTURES / "cifar10_tiny_train.parquet")}
    with pytest.raises(ConfigError, match=r"the config's calibration_dataset=.*config\.replace\(calibration_dataset"):
        DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(
            config=DFQConfig(bits="w8a8", calibration_dataset=spec), synthesizer="psaq")


def test_provisional_run_gives_the_hardness_term_the_runs_own_quantization_settings(image_processor):
    fast = {"iterations": (2, 2), "warmup": 1, "jitter": (2, 4)}
    config = DFQConfig(bits="w3a4", post_softmax="tanq", num_images=2, correction={"kind": "affine"},
                       synthesizer_kwargs={**fast, "hardness_weight": 1.0, "provisional": "run"})
    calibration = DataFreeViTQuantizer.calibration_set(tiny_vit(), config, None, image_processor)
    provisional = calibration.metadata["hyperparameters"]["provisional"]
    assert (provisional["bits"], provisional["post_softmax"]) == ("w3a4", "tanq")
    assert "correction" not in provisional and "synthesizer" not in provisional
    assert config.synthesizer_kwargs["provisional"] == "run"  # the run's config is left as written
