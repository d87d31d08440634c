"""Refusals of `optimum_dfq.formats.checkpoint`: what cannot be saved, and checkpoints that must not load silently."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers.core_model_loading
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, ViTForImageClassification

from optimum_dfq import CheckpointError
from optimum_dfq.calibration.convert import QuantizationPlan
from optimum_dfq.formats.checkpoint import (
    METADATA_KEY,
    checkpoint_metadata,
    read_checkpoint_info,
    verify_loaded,
)

from ..conftest import tiny_vit
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


def test_plan_written_by_a_newer_version_asks_for_an_upgrade(checkpoint):
    _edit(checkpoint, plan=lambda payload: payload["plan"].update(future_stage={"vit.layers.0": "x"}))
    with pytest.raises(CheckpointError, match=r"field\(s\) \['future_stage'\].*newer version.*pip install -U"):
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


def test_loading_in_another_float_dtype_skips_the_digest_check_with_an_info_log(saved_vit, caplog):
    with caplog.at_level(logging.INFO, logger="optimum_dfq.formats.checkpoint"):
        model = AutoModelForImageClassification.from_pretrained(saved_vit, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    skipped = [r.getMessage() for r in caplog.records if r.name == "optimum_dfq.formats.checkpoint"]
    assert skipped == ["Loaded in bfloat16 instead of float32: skipping the checkpoint digest check."]


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
