"""Activation-quantizer sites, found from structure and dataflow."""

from __future__ import annotations

import pytest
import torch

from optimum_dfq import DataFreeViTQuantizer, DFQConfig
from optimum_dfq.calibration import iter_quantizers
from optimum_dfq.calibration.sites import ACTIVATION_SITES, activation_sites, linear_roles
from optimum_dfq.models import find_activation_consumers, get_adapter

from ..conftest import tiny_deit_teacher, tiny_swin, tiny_vit

PIXELS = torch.randn(1, 3, 32, 32)


def sites_of(factory, bits="w4a4"):
    model = factory()
    post_gelu = find_activation_consumers(model, PIXELS)
    qmodel = DataFreeViTQuantizer().quantize(model, bits=bits, synthesizer="gaussian", num_images=4)
    sites = activation_sites(qmodel, get_adapter(qmodel), PIXELS)  # the model's own plan
    return qmodel, sites, post_gelu


@pytest.mark.parametrize("factory", [tiny_vit, tiny_deit_teacher, tiny_swin], ids=["vit", "deit", "swin"])
def test_every_activation_quantizer_has_exactly_one_site(factory):
    qmodel, sites, post_gelu = sites_of(factory)
    activations = {name for name, _ in iter_quantizers(qmodel) if not name.endswith("weight_quantizer")}
    listed = [name for names in sites.values() for name in names]
    assert sorted(listed) == sorted(activations)  # each once, none missing
    assert list(sites) == [site for site in ACTIVATION_SITES if site in sites]
    blocks = len(list(get_adapter(qmodel).blocks(qmodel)))
    for site in ("qkv_input", "query", "key", "probs", "value", "o_proj_input", "fc1_input", "fc2_input"):
        assert len(sites[site]) == blocks, site
    # the site found by role agrees with the dataflow tracing of the float model
    assert sites["fc2_input"] == [f"{name}.input_quantizer" for name in post_gelu]
    assert all(name.endswith("output_quantizer") for name in sites["qkv_input"] + sites["fc1_input"])
    assert len(sites["image"]) == 1 and len(sites["classifier_input"]) >= 1


def test_swin_patch_merging_is_its_own_site():
    _, sites, _ = sites_of(tiny_swin)
    assert len(sites["reduction_input"]) == 1  # depths [2, 2]: one patch merging
    _, vit_sites, _ = sites_of(tiny_vit)
    assert "reduction_input" not in vit_sites


def test_a_wrong_consumer_map_is_refused():
    qmodel, sites, _ = sites_of(tiny_vit)
    plan = dict(qmodel.hf_quantizer.plan.layernorm_consumers)
    norm, consumers = next(iter(plan.items()))
    fc2 = sites["fc2_input"][0].rpartition(".input_quantizer")[0]
    plan[norm] = [*consumers, fc2]  # a qkv LayerNorm claimed to feed fc2 too
    with pytest.raises(ValueError, match="expected exactly one role"):
        activation_sites(qmodel, get_adapter(qmodel), PIXELS, plan)


def test_a_model_without_a_plan_needs_the_consumer_map():
    model = tiny_vit()
    with pytest.raises(ValueError, match="no quantization plan.*layernorm_consumers="):
        activation_sites(model, get_adapter(model), PIXELS)


def test_a_loaded_checkpoint_has_the_same_sites(tmp_path):
    from transformers import AutoModelForImageClassification

    qmodel, sites, _ = sites_of(tiny_swin, bits="w4a8")
    qmodel.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert activation_sites(loaded, get_adapter(loaded), PIXELS) == sites


def test_one_site_can_run_in_float_and_is_restored():
    from optimum_dfq.calibration import quantization_disabled

    qmodel, sites, _ = sites_of(tiny_vit)
    before = {name: q.mode for name, q in iter_quantizers(qmodel)}
    with quantization_disabled(qmodel, sites["fc1_input"]):
        off = {name for name, q in iter_quantizers(qmodel) if q.mode == "off"}
    assert off == set(sites["fc1_input"]) | {name for name, mode in before.items() if mode == "off"}
    assert sites["fc1_input"] and not off & set(sites["qkv_input"])
    assert {name: q.mode for name, q in iter_quantizers(qmodel)} == before


def test_a_weight_only_model_has_no_activation_site():
    _, sites, _ = sites_of(tiny_vit, bits="w4a16")
    assert sites == {}


def test_a_quantized_layernorm_missing_from_the_consumer_map_is_refused():
    qmodel, _, _ = sites_of(tiny_vit)
    plan = dict(qmodel.hf_quantizer.plan.layernorm_consumers)
    norm = next(iter(plan))
    del plan[norm]
    with pytest.raises(ValueError, match=rf"{norm} is read by Linears of roles \[\]; expected exactly one role"):
        activation_sites(qmodel, get_adapter(qmodel), PIXELS, plan)


def test_finding_roles_leaves_no_hook_on_the_model():
    model = tiny_vit()
    linear_roles(model, get_adapter(model), PIXELS)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_qkv_share_a_correction_site_only_when_they_read_one_quantized_tensor():
    """In block 0 q_proj stays float, so the LayerNorm before it stays float and k and v quantize their own inputs:
    two sites there (the float q_proj is none); block 1's q, k and v read one quantized LayerNorm output: one site."""
    from optimum_dfq.calibration import CalibrationSet, quantize_model
    from optimum_dfq.calibration.sites import LinearGroup, linear_groups

    model = tiny_vit()
    roles = linear_roles(model, get_adapter(model), PIXELS)
    qkv = [name for name, role in roles.items() if role == "qkv"]
    config = DFQConfig(bits="w4a4", input_range="calibrated", modules_to_not_convert=[qkv[0]])
    qmodel, _ = quantize_model(model, CalibrationSet(pixel_values=torch.randn(2, 3, 32, 32)), config)
    groups = linear_groups(qmodel, linear_roles(qmodel, get_adapter(qmodel), PIXELS), ["qkv"])
    assert groups == [LinearGroup("qkv", (qkv[1],)), LinearGroup("qkv", (qkv[2],)), LinearGroup("qkv", tuple(qkv[3:]))]


def test_roles_are_found_while_some_quantizers_are_uncalibrated():
    """The probe forward pass switches off only the quantizers not calibrated yet (they would refuse to run), finds
    the float model's roles, and leaves every quantizer as it was."""
    model = tiny_vit()
    float_roles = linear_roles(model, get_adapter(model), PIXELS)
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w4a4", synthesizer="gaussian", num_images=2)
    reset = [quantizer for name, quantizer in iter_quantizers(qmodel) if name.endswith("input_quantizer")]
    for quantizer in reset:
        quantizer.reset()
    states = {name: (q.mode, bool(q.calibrated)) for name, q in iter_quantizers(qmodel)}
    assert reset and not any(bool(q.calibrated) for q in reset)
    assert linear_roles(qmodel, get_adapter(qmodel), PIXELS) == float_roles
    assert {name: (q.mode, bool(q.calibrated)) for name, q in iter_quantizers(qmodel)} == states
