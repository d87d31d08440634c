"""Switching quantizers by kind or by name."""

from __future__ import annotations

import pytest

from optimum_dfq import DataFreeViTQuantizer
from optimum_dfq.calibration import iter_quantizers, quantization_disabled, set_quantizer_modes
from optimum_dfq.errors import ConfigError

from ..conftest import tiny_vit


@pytest.fixture(scope="module")
def qmodel():
    return DataFreeViTQuantizer().quantize(tiny_vit(), bits="w4a4", synthesizer="gaussian", num_images=4)


def test_unknown_quantizer_names_are_refused_and_nothing_is_switched(qmodel):
    before = {name: q.mode for name, q in iter_quantizers(qmodel)}
    names = ["classifier.input_quantizer", "classifier.nope"]
    with (pytest.raises(ConfigError, match=r"\['classifier\.nope'\] are not quantizers of the model"),
          quantization_disabled(qmodel, names)):
        pass
    assert {name: q.mode for name, q in iter_quantizers(qmodel)} == before


def test_modes_are_restored_even_when_the_block_raises(qmodel):
    before = {name: q.mode for name, q in iter_quantizers(qmodel)}
    with pytest.raises(RuntimeError, match="inside"), quantization_disabled(qmodel, ["classifier.input_quantizer"]):
        assert qmodel.classifier.input_quantizer.mode == "off"
        raise RuntimeError("inside")
    assert {name: q.mode for name, q in iter_quantizers(qmodel)} == before


def test_set_quantizer_modes_switches_activations_only(qmodel):
    activations = [q for name, q in iter_quantizers(qmodel) if not name.endswith("weight_quantizer")]
    weights = [q for name, q in iter_quantizers(qmodel) if name.endswith("weight_quantizer")]
    try:
        set_quantizer_modes(qmodel, activations="off")
        assert {q.mode for q in activations} == {"off"}
        assert {q.mode for q in weights} == {"quantize"}
    finally:
        set_quantizer_modes(qmodel, activations="quantize")


def test_set_quantizer_modes_refuses_an_unknown_mode_before_switching_anything(qmodel):
    before = {name: q.mode for name, q in iter_quantizers(qmodel)}
    with pytest.raises(ValueError, match="Unknown quantizer mode 'bogus'"):
        set_quantizer_modes(qmodel, weights="off", activations="bogus")
    assert {name: q.mode for name, q in iter_quantizers(qmodel)} == before


def test_each_quantizer_gets_back_its_own_mode_and_the_default_is_every_quantizer(qmodel):
    already_off, switched = "classifier.input_quantizer", "vit.layers.0.mlp.fc2.input_quantizer"
    quantizers = dict(iter_quantizers(qmodel))
    quantizers[already_off].set_mode("off")
    try:
        with quantization_disabled(qmodel, [already_off, switched]):
            assert quantizers[switched].mode == "off"
        assert (quantizers[already_off].mode, quantizers[switched].mode) == ("off", "quantize")
        with quantization_disabled(qmodel):
            assert {q.mode for q in quantizers.values()} == {"off"}
        assert quantizers[already_off].mode == "off"
        assert {q.mode for name, q in quantizers.items() if name != already_off} == {"quantize"}
    finally:
        quantizers[already_off].set_mode("quantize")


def test_set_quantizer_modes_leaves_the_kind_given_none_as_it_is(qmodel):
    weights = [q for name, q in iter_quantizers(qmodel) if name.endswith("weight_quantizer")]
    try:
        weights[0].set_mode("off")
        set_quantizer_modes(qmodel, activations="quantize")
        assert weights[0].mode == "off" and {q.mode for q in weights[1:]} == {"quantize"}
    finally:
        weights[0].set_mode("quantize")


def test_a_misspelt_quantizer_name_is_refused(qmodel):
    with pytest.raises(ConfigError, match=r"fc1\.output_quantizer'\] are not quantizers"), \
            quantization_disabled(qmodel, ["vit.layers.0.mlp.fc1.output_quantizer"]):
        pass
