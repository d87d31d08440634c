"""The frozen (packed) state of quantized modules, as returned by `quantize()`."""

import copy

import pytest
import torch

from optimum_dfq import CheckpointError, DataFreeViTQuantizer, DFQError
from optimum_dfq.calibration import quantization_disabled, quantize_model
from optimum_dfq.calibration.data import CalibrationSet
from optimum_dfq.formats.checkpoint import check_saveable, freeze_model
from optimum_dfq.nn import QConv2d, QLinear

from ..conftest import tiny_swin, tiny_vit


def _unfrozen(model, bits="w3a4"):
    from optimum_dfq import DFQConfig

    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, CalibrationSet(torch.randn(8, 3, 32, 32)), DFQConfig(bits=bits))
    return qmodel


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin])
def test_freezing_is_exact_and_packs_every_weight(factory):
    qmodel = _unfrozen(factory())
    modules = [m for m in qmodel.modules() if isinstance(m, (QLinear, QConv2d))]
    fake_quant = [m.weight_quantizer.fake_quant(m.weight.detach()) for m in modules]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = qmodel(pixel_values=pixels).logits
    assert freeze_model(qmodel) == len(modules)
    for module, expected in zip(modules, fake_quant):
        assert module.is_frozen and "weight" not in module._parameters
        assert module.weight_packed.dtype == torch.uint8
        assert module.weight_packed.numel() * 8 >= expected.numel() * 3  # 3-bit codes, densely packed
        assert module.weight_packed.numel() < expected.numel() * 3 / 8 + module.weight_packed.shape[0]
        assert torch.equal(module.quantized_weight(), expected)  # bit-identical to the fake-quantized weight
        assert torch.equal(module.weight, expected)  # `.weight` reads the dequantized codes
    with torch.no_grad():
        assert torch.equal(qmodel(pixel_values=pixels).logits, before)
    keys = qmodel.state_dict()
    names = [n for n, m in qmodel.named_modules() if isinstance(m, (QLinear, QConv2d))]
    assert all(f"{n}.weight" not in keys and f"{n}.weight_packed" in keys and f"{n}.weight_shape" in keys
               for n in names)
    assert freeze_model(qmodel) == 0  # idempotent


def test_quantize_returns_a_frozen_model_that_refuses_float_use():
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w4a4", synthesizer="gaussian", num_images=4)
    assert all(m.is_frozen for m in qmodel.modules() if isinstance(m, (QLinear, QConv2d)))
    assert qmodel.hf_quantizer.plan.layernorm_consumers  # what rebuilds the skeleton when loading
    with pytest.raises(DFQError, match="cannot be re-calibrated"):
        qmodel.classifier.calibrate_weights()
    with pytest.raises(DFQError, match="frozen to integer codes"), quantization_disabled(qmodel):
        qmodel(pixel_values=torch.randn(1, 3, 32, 32))


def test_saving_float_weights_as_a_checkpoint_is_refused(tmp_path):
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w4a4", synthesizer="gaussian", num_images=4)
    unfrozen = _unfrozen(tiny_vit(), "w4a4")
    with pytest.raises(CheckpointError, match="still float"):
        check_saveable(unfrozen)
    # a model whose weights were put back in float (not packed) must not be saved as if packed
    qmodel.classifier = unfrozen.classifier
    with pytest.raises(CheckpointError, match=r"classifier are still float \(not packed\)"):
        qmodel.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_freezing_an_uncalibrated_weight_is_refused_and_leaves_the_float_weight():
    from optimum_dfq.errors import CalibrationError
    from optimum_dfq.quantizers import build_quantizer

    linear = QLinear.from_float(torch.nn.Linear(4, 3), build_quantizer("uniform", bits=4, channels=3, axis=0), None,
                                "fc")
    with pytest.raises(CalibrationError, match="cannot freeze an uncalibrated weight quantizer"):
        linear.freeze()
    assert not linear.is_frozen and isinstance(linear.weight, torch.nn.Parameter)
