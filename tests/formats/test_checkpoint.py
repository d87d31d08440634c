"""Refusals of `optimum_dfq.formats.checkpoint`: what cannot be saved, and checkpoints that must not load silently."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
import transformers.core_model_loading
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    DeiTForImageClassification,
    ViTForImageClassification,
)

from optimum_dfq import CheckpointError
from optimum_dfq.calibration.convert import QuantizationPlan
from optimum_dfq.formats.checkpoint import (
    METADATA_KEY,
    checkpoint_metadata,
    read_checkpoint_info,
    state_digest,
    verify_loaded,
)

from ..conftest import tiny_deit_teacher, tiny_vit
from ..integrations.conftest import quantize

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit-w4a4")
    quantize(tiny_vit, "w4a4").save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(saved_vit, tmp_path):
    """A private copy of the saved checkpoint folder, free to damage."""
    return shutil.copytree(saved_vit, tmp_path / "checkpoint")


def _edit(folder, tensors=None, plan=None, raw_metadata=None):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
    state = load_file(path)
    if tensors:
        state.update(tensors)
    if plan:
        payload = json.loads(header[METADATA_KEY])
        plan(payload)
        header[METADATA_KEY] = json.dumps(payload)
    if raw_metadata is not None:
        header[METADATA_KEY] = raw_metadata
    save_file(state, path, metadata=header)


def test_saving_a_model_with_an_uncalibrated_quantizer_is_refused(tmp_path):
    qmodel = quantize(tiny_vit, "w4a4")
    qmodel.classifier.input_quantizer.reset()
    with pytest.raises(CheckpointError, match=r"quantizer\(s\) classifier\.input_quantizer are not calibrated.*"
                                              r"Calibrate them before saving"):
        qmodel.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_loading_from_a_state_dict_is_refused(saved_vit):
    config = AutoConfig.from_pretrained(saved_vit)
    state_dict = load_file(saved_vit / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformers resolved none.*state_dict.*Load from the saved folder"):
        ViTForImageClassification.from_pretrained(None, config=config, state_dict=state_dict)


def test_pytorch_bin_checkpoint_is_refused(checkpoint):
    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a safetensors file.*save_pretrained"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), FileNotFoundError(2, "No such file")])
def test_a_checkpoint_file_that_cannot_be_read_is_named_with_the_cause_not_called_corrupt(error, saved_vit,
                                                                                         monkeypatch):
    # an OSError from safe_open (an unreadable file, a link into the Hub cache whose blob is gone) was reported as
    # "corrupt or truncated", sending the user to download a file that is fine
    import safetensors

    def refuse(path, *args, **kwargs):
        raise type(error)(error.errno, error.strerror, path)

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    path = str(saved_vit / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"The checkpoint file {re.escape(path)} could not be read "
                                              rf"\({type(error).__name__}: .*{error.strerror}.*\)") as err:
        read_checkpoint_info([path])
    assert "corrupt" not in str(err.value) and isinstance(err.value.__cause__, type(error))


def test_plan_written_by_a_newer_version_asks_for_an_upgrade(checkpoint):
    _edit(checkpoint, plan=lambda payload: payload["plan"].update(future_stage={"vit.layers.0": "x"}))
    with pytest.raises(CheckpointError, match=r"field\(s\) \['future_stage'\].*newer version.*pip install -U"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


def test_plan_naming_a_module_the_model_does_not_have_is_a_checkpoint_error(checkpoint):
    # get_submodule's AttributeError ("ViTEncoder has no attribute `7`") said nothing about the checkpoint
    consumers = {"vit.layers.7.layernorm_before": ["vit.layers.7.attention.q_proj"]}
    _edit(checkpoint, plan=lambda payload: payload["plan"]["layernorm_consumers"].update(consumers))
    with pytest.raises(CheckpointError, match=r"quantization plan does not fit ViTForImageClassification: "
                                              r"AttributeError\(.*saved from another architecture"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


MALFORMED = {
    "not json": ("{plan", "JSONDecodeError"),
    "no plan": (json.dumps({"sha256": "0" * 64}), "KeyError: 'plan'"),
    "no digest": (None, "KeyError: 'sha256'"),
    "plan not an object": (json.dumps({"plan": 3, "sha256": "0" * 64}), "TypeError"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_raises_a_checkpoint_error(case, checkpoint):
    raw, cause = MALFORMED[case]
    if raw is None:
        _edit(checkpoint, plan=lambda payload: payload.pop("sha256"))
    else:
        _edit(checkpoint, raw_metadata=raw)
    with pytest.raises(CheckpointError, match=f"'{METADATA_KEY}' metadata of .* is malformed \\({cause}.*"
                                              "download or save it again"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


def test_weight_shape_that_disagrees_with_the_module_is_refused(checkpoint):
    _edit(checkpoint, tensors={"classifier.weight_shape": torch.tensor([10, 16])})
    with pytest.raises(CheckpointError, match=r"classifier\.weight_shape is \[10, 16\] but the module's weight is "
                                              r"\[10, 32\].*save it again"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


def test_checkpoint_with_an_uncalibrated_quantizer_is_refused(checkpoint):
    _edit(checkpoint, tensors={"classifier.input_quantizer.calibrated": torch.tensor(False)})
    with pytest.raises(CheckpointError, match=r"uncalibrated quantizer\(s\): classifier\.input_quantizer\..*"
                                              "save it again"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


def _strip_metadata(folder, *keys):
    """Removes `keys` from the checkpoint's metadata: what a checkpoint written before they existed holds."""
    _edit(folder, plan=lambda payload: [payload.pop(key) for key in keys])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_flipped_packed_code_is_caught_in_every_dtype(dtype, checkpoint):
    packed = load_file(checkpoint / "model.safetensors")["classifier.weight_packed"].clone()
    packed[0, 0] ^= 0xF0
    _edit(checkpoint, tensors={"classifier.weight_packed": packed})
    with pytest.raises(CheckpointError, match=r"integer tensors \(packed weight codes.*SHA-256 mismatch.*"
                                              "force_download=True"):
        AutoModelForImageClassification.from_pretrained(checkpoint, **({"dtype": dtype} if dtype else {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_checks_the_float_tensors_against_their_cast_digest(dtype, saved_vit, checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="optimum_dfq.formats.checkpoint"):
        model = AutoModelForImageClassification.from_pretrained(saved_vit, dtype=dtype)
    assert model.dtype == dtype
    assert not [r for r in caplog.records if r.name == "optimum_dfq.formats.checkpoint"]  # fully verified
    scale = load_file(checkpoint / "model.safetensors")["classifier.weight_quantizer.scale"]
    _edit(checkpoint, tensors={"classifier.weight_quantizer.scale": scale * 2})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"differ from the ones that were saved, cast to {name} "
                                              r"\(SHA-256 mismatch\)"):
        AutoModelForImageClassification.from_pretrained(checkpoint, dtype=dtype)


def _checkpoint_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "optimum_dfq.formats.checkpoint"]


def test_float32_module_kept_beside_a_half_precision_load_is_verified_by_the_cast_digest(checkpoint, monkeypatch,
                                                                                          caplog):
    monkeypatch.setattr(ViTForImageClassification, "_keep_in_fp32_modules", ["classifier"])  # as some models declare
    with caplog.at_level(logging.INFO, logger="optimum_dfq.formats.checkpoint"):
        model = AutoModelForImageClassification.from_pretrained(checkpoint, dtype=torch.float16)
    assert model.classifier.bias.dtype == torch.float32 and model.vit.layernorm.weight.dtype == torch.float16
    assert _checkpoint_logs(caplog) == []  # float16 + the saved float32: the float16 digest covers the whole state
    bias = load_file(checkpoint / "model.safetensors")["classifier.bias"]
    _edit(checkpoint, tensors={"classifier.bias": bias + 1})
    with pytest.raises(CheckpointError, match=r"cast to float16 \(SHA-256 mismatch\)"):
        AutoModelForImageClassification.from_pretrained(checkpoint, dtype=torch.float16)


def test_load_in_two_new_float_dtypes_verifies_the_integer_tensors_and_says_so(saved_vit, tmp_path, monkeypatch,
                                                                                caplog):
    folder = tmp_path / "float16"
    AutoModelForImageClassification.from_pretrained(saved_vit, dtype=torch.float16).save_pretrained(folder)
    monkeypatch.setattr(ViTForImageClassification, "_keep_in_fp32_modules_strict", ["classifier"])
    with caplog.at_level(logging.INFO, logger="optimum_dfq.formats.checkpoint"):
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.classifier.bias.dtype == torch.float32 and model.vit.layernorm.weight.dtype == torch.bfloat16
    assert _checkpoint_logs(caplog) == [(
        "Loaded in mixed float dtypes (bfloat16, float32) instead of float16: the checkpoint records no digest for a "
        "mix of dtypes, so only its integer tensors were verified.")]
    packed = load_file(folder / "model.safetensors")["classifier.weight_packed"].clone()
    packed[0, 0] ^= 0x0F
    _edit(folder, tensors={"classifier.weight_packed": packed})
    with pytest.raises(CheckpointError, match=r"integer tensors \(packed weight codes.*SHA-256 mismatch"):
        AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16)


def test_mixed_float_dtypes_are_not_compared_with_the_digest_of_one_cast(saved_vit):
    """A state mixing float16 and bfloat16 matches neither cast digest: comparing it with one would be a false alarm."""
    info = read_checkpoint_info([str(saved_vit / "model.safetensors")])
    model = AutoModelForImageClassification.from_pretrained(saved_vit, dtype=torch.float16)
    for tensor in [*model.classifier.parameters(), *model.classifier.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.bfloat16)  # in place: the tensors keep transformers' loaded flags
    assert state_digest(model.state_dict(), torch.float16) != info.cast_sha256["float16"]
    verify_loaded(model, info)


def test_checkpoint_without_cast_digests_verifies_its_integer_tensors(checkpoint, caplog):
    _strip_metadata(checkpoint, "cast_sha256")
    with caplog.at_level(logging.INFO, logger="optimum_dfq.formats.checkpoint"):
        AutoModelForImageClassification.from_pretrained(checkpoint, dtype=torch.float16)
    logged = [r.getMessage() for r in caplog.records if r.name == "optimum_dfq.formats.checkpoint"]
    assert logged == [("Loaded in float16 instead of float32: the checkpoint records no digest for that dtype, so "
                      "only its integer tensors were verified.")]


def test_checkpoint_without_integer_and_cast_digests_still_loads_in_another_dtype(checkpoint, caplog):
    _strip_metadata(checkpoint, "integer_sha256", "cast_sha256")
    with caplog.at_level(logging.INFO, logger="optimum_dfq.formats.checkpoint"):
        model = AutoModelForImageClassification.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    logged = [r.getMessage() for r in caplog.records if r.name == "optimum_dfq.formats.checkpoint"]
    assert logged == [("Loaded in bfloat16 instead of float32: the checkpoint was written before per-dtype and "
                      "integer digests were recorded, so the digest check is skipped.")]
    AutoModelForImageClassification.from_pretrained(checkpoint)  # float32: the whole-state digest still applies


EDITED_CONFIGS = {
    "input_bits": (4, "input_bits is 4 in config.json but 8 in the weights"),
    "bits": ("w4a8", "bits is 'w4a8' in config.json but 'w4a4' in the weights"),
    "weight_symmetric": (True, "weight_symmetric is True in config.json but False in the weights"),
    "post_softmax": ("log2", "post_softmax is 'log2' in config.json but 'auto' in the weights"),
}


@pytest.mark.parametrize("field", sorted(EDITED_CONFIGS))
def test_edited_quantization_config_is_refused_before_loading(field, checkpoint):
    value, expected = EDITED_CONFIGS[field]
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"][field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json and the weights disagree: .*{re.escape(expected)}.*"
                                              "Restore config.json from the same save"):
        AutoModelForImageClassification.from_pretrained(checkpoint)
    _strip_metadata(checkpoint, "quantization_config")  # written before the copy was recorded: not checked
    if field == "weight_symmetric":  # no structural effect: loads
        AutoModelForImageClassification.from_pretrained(checkpoint)


def test_an_invalid_quantization_config_copy_in_the_weights_is_a_checkpoint_error(checkpoint):
    # config.json is valid: the ConfigError about the weights file's copy would send the user to edit config.json
    _edit(checkpoint, plan=lambda payload: payload["quantization_config"].update(bits="w9a9"))
    with pytest.raises(CheckpointError, match=r"quantization_config recorded in the 'optimum_dfq' metadata of the "
                                              r"checkpoint is invalid \(.*outside 2\.\.8.*\), although config\.json's "
                                              "is valid.*save the checkpoint again as a whole"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def saved_vit_w8a8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit-w8a8")
    quantize(tiny_vit, "w8a8").save_pretrained(folder)
    return folder


def test_weights_of_another_save_are_refused_by_config_then_by_shape(checkpoint, saved_vit_w8a8):
    shutil.copy(saved_vit_w8a8 / "model.safetensors", checkpoint / "model.safetensors")  # w8a8 next to w4a4
    with pytest.raises(CheckpointError, match="bits is 'w4a4' in config.json but 'w8a8' in the weights"):
        AutoModelForImageClassification.from_pretrained(checkpoint)
    _strip_metadata(checkpoint, "quantization_config")  # an older checkpoint: the header shapes catch it
    with pytest.raises(CheckpointError, match=r"do not have the shapes of the quantized ViTForImageClassification "
                                              r"built from its config.json: classifier\.weight_packed: \[10, 32\] in "
                                              r"the checkpoint, \[10, 16\] in the model.*different saves"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


@pytest.mark.parametrize("ignore", [False, True])
def test_other_num_labels_is_named_as_the_cause(ignore, saved_vit):
    with pytest.raises(CheckpointError, match=r"built with num_labels=5 .* classifier has 10 outputs.*cannot be "
                                              "resized"):
        AutoModelForImageClassification.from_pretrained(saved_vit, num_labels=5, ignore_mismatched_sizes=ignore)


def test_a_transposed_classifier_is_not_blamed_on_num_labels(checkpoint):
    packed = load_file(checkpoint / "model.safetensors")["classifier.weight_packed"]
    _edit(checkpoint, tensors={"classifier.weight_packed": packed.t().contiguous()})  # [16, 10] where [10, 16] belongs
    with pytest.raises(CheckpointError, match=r"classifier\.weight_packed: \[16, 10\] in the checkpoint, \[10, 16\] "
                                              r"in the model.*different saves") as err:
        AutoModelForImageClassification.from_pretrained(checkpoint)
    assert "num_labels" not in str(err.value)


def test_a_renamed_tensor_of_another_size_is_named_as_the_model_calls_it_and_not_blamed_on_num_labels(checkpoint):
    # ViT checkpoints keep transformers 4 names (attention.attention.query) that loading renames (q_proj): the shape
    # check must compare under the loading name. A first dimension that differs elsewhere than in the classifier is
    # no num_labels matter.
    name = "vit.encoder.layer.0.attention.attention.query.bias"
    assert name in load_file(checkpoint / "model.safetensors")
    _edit(checkpoint, tensors={name: torch.zeros(24)})
    with pytest.raises(CheckpointError, match=r"vit\.layers\.0\.attention\.q_proj\.bias: \[24\] in the checkpoint, "
                                              r"\[32\] in the model\..*different saves") as err:
        AutoModelForImageClassification.from_pretrained(checkpoint)
    assert "num_labels" not in str(err.value)


def test_checkpoint_of_another_class_names_the_saved_class(tmp_path):
    quantize(tiny_deit_teacher, "w4a4").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="saved from a DeiTForImageClassificationWithTeacher .* loaded into a "
                                              r"DeiTForImageClassification\..*use DeiTForImageClassificationWith"
                                              r"Teacher\.from_pretrained"):
        DeiTForImageClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["SwinForImageClassification", "DeiTForImageClassification"])
def test_checkpoint_loaded_with_another_family_is_refused_before_the_model_is_built(family, saved_vit):
    """transformers converts config.json to the loading class's config; a ViT config made into a SwinConfig failed
    inside Swin's construction with "'int' object is not subscriptable"."""
    with pytest.raises(CheckpointError, match=r"saved from a ViTForImageClassification .* loaded into a model of type "
                                              r"'(swin|deit)' .*use ViTForImageClassification\.from_pretrained"):
        getattr(transformers, family).from_pretrained(saved_vit)


def test_model_without_float_tensors_records_no_float_dtype_and_keeps_the_digest_check(tmp_path):
    model = nn.Module()
    model.register_buffer("codes", torch.arange(4, dtype=torch.uint8))
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path, metadata=checkpoint_metadata(model, QuantizationPlan()))
    info = read_checkpoint_info([str(path)])
    assert info.float_dtype is None
    verify_loaded(model, info)
    model.codes[0] = 7
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        verify_loaded(model, info)


def test_extra_tensors_are_named_when_transformers_cannot_map_checkpoint_keys(saved_vit, monkeypatch):
    model = AutoModelForImageClassification.from_pretrained(saved_vit)
    info = read_checkpoint_info([str(saved_vit / "model.safetensors")])
    info.tensor_names = set(model.state_dict()) | {"vit.extra"}
    monkeypatch.delattr(transformers.core_model_loading, "revert_weight_conversion")  # as in older transformers
    with pytest.raises(CheckpointError, match=r"does not have: vit\.extra\. .*re-save it"):
        verify_loaded(model, info)


@pytest.mark.parametrize("tensor", ["classifier.weight_quantizer.scale", "classifier.bias"])
def test_edited_float_tensor_is_caught_when_loading_in_the_saved_dtype(tensor, checkpoint):
    # packed codes and calibration flags are untouched: only the whole-state digest can tell
    value = load_file(checkpoint / "model.safetensors")[tensor]
    _edit(checkpoint, tensors={tensor: value * 2 + 0.5})
    with pytest.raises(CheckpointError, match=r"The loaded tensors differ from the ones that were saved \(SHA-256 "
                                              r"mismatch\).*force_download=True"):
        AutoModelForImageClassification.from_pretrained(checkpoint)


def test_state_digest_tells_dtypes_apart_even_with_identical_bytes():
    values = torch.arange(4, dtype=torch.int32)
    assert state_digest({"t": values}) != state_digest({"t": values.view(torch.float32)})  # same bytes and shape
    assert state_digest({"t": values}) == state_digest({"t": values.clone()})
