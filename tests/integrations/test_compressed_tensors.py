"""compressed-tensors export: loads in a fresh process with plain transformers, without importing optimum_dfq."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from optimum_dfq import ConfigError, DFQConfig
from optimum_dfq.formats.compressed_tensors import EXPORT_MARKER, compressed_tensors_blockers, export_compressed_tensors
from optimum_dfq.quantizers import UniformQuantizer

from ..conftest import tiny_deit_teacher, tiny_swin, tiny_vit
from .conftest import logits, quantize, run_python

pytest.importorskip(
    "compressed_tensors",
    reason='compressed-tensors is not installed (pip install "optimum-dfq[compressed-tensors]")',
)

LINEAR_ONLY = {"quantize_attention": False, "modules_to_not_convert": ["re:.*patch_embeddings\\.projection"]}
EXPORTS = {  # name: (model, config, exact)
    "vit-w4a16": (tiny_vit, DFQConfig(bits="w4a16"), True),
    "vit-w4a16-symmetric": (tiny_vit, DFQConfig(bits="w4a16", weight_symmetric=True), True),
    "vit-w8a16-symmetric": (tiny_vit, DFQConfig(bits="w8a16", weight_symmetric=True), True),
    # a Linear kept in float must stay float in the export (compressed-tensors' ignore list)
    "vit-w4a16-float-classifier": (tiny_vit, DFQConfig(bits="w4a16", modules_to_not_convert=["classifier"]), True),
    "swin-w3a16": (tiny_swin, DFQConfig(bits="w3a16"), True),
    "deit-w8a16": (tiny_deit_teacher, DFQConfig(bits="w8a16"), True),
    "vit-w8a8": (tiny_vit, DFQConfig(bits="w8a8", **LINEAR_ONLY), False),
    "vit-w4a8": (tiny_vit, DFQConfig(bits="w4a8", **LINEAR_ONLY), False),
}

LOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForImageClassification

pixels, out = torch.load({pixels!r}), {{}}
for name, folder in json.loads({index!r}).items():
    model = AutoModelForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        out[name] = {{"logits": model(pixel_values=pixels).logits, "quantizer": type(model.hf_quantizer).__name__}}
out["optimum_dfq imported"] = "optimum_dfq" in sys.modules
torch.save(out, {out!r})
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pixels):
    root = tmp_path_factory.mktemp("ct")
    folders, expected = {}, {}
    for name, (factory, config, exact) in EXPORTS.items():
        qmodel = quantize(factory, config=config)
        folders[name] = str(root / name)
        qmodel.save_pretrained(folders[name], format="compressed-tensors", exact=exact)
        expected[name] = logits(qmodel, pixels[0])
    out = root / "results.pt"
    result = run_python(LOAD_SCRIPT.format(pixels=str(pixels[1]), index=json.dumps(folders), out=str(out)))
    assert result.returncode == 0, result.stderr[-4000:]
    return folders, expected, torch.load(out)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_plain_transformers_loads_the_export_without_optimum_dfq(name, exported):
    folders, expected, results = exported
    assert results["optimum_dfq imported"] is False
    assert results[name]["quantizer"] == "CompressedTensorsHfQuantizer"
    config = json.loads(Path(folders[name], "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["attn_implementation"] == "eager"
    diff = (results[name]["logits"] - expected[name]).abs().max().item()
    if EXPORTS[name][2]:  # exact exports: bit-identical predictions
        assert diff == 0.0
    else:  # activation rounding may differ on rare half-way values, moving a logit far less than 1% of the largest
        assert diff < 1e-2 * expected[name].abs().max().item()


def test_symmetric_weights_are_packed(exported):
    folders, _, _ = exported
    formats = {n: json.loads(Path(f, "config.json").read_text())["quantization_config"]["format"]
               for n, f in folders.items()}
    assert formats["vit-w4a16-symmetric"] == "pack-quantized"
    assert formats["vit-w4a16"] == "int-quantized"  # transformers cannot load packed asymmetric zero points


def test_quantize_replaces_its_own_export_but_not_another_tools(tmp_path):
    # quantize(save_dir=) refused an earlier compressed-tensors export of optimum_dfq: it could not tell it from
    # another tool's quantized model, which it must not overwrite
    from optimum_dfq import __version__

    quantize(tiny_vit, "w4a16").save_pretrained(tmp_path / "ours", format="compressed-tensors")
    marker = json.loads((tmp_path / "ours" / "config.json").read_text())[EXPORT_MARKER]
    assert marker == {"format": "compressed-tensors", "bits": "w4a16", "version": __version__}
    quantize(tiny_vit, "w8a8", save_dir=tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "optimum_dfq")

    quantize(tiny_vit, "w4a16").save_pretrained(tmp_path / "other", format="compressed-tensors")
    stored = json.loads((tmp_path / "other" / "config.json").read_text())
    del stored[EXPORT_MARKER]  # as another tool's compressed-tensors checkpoint has it
    (tmp_path / "other" / "config.json").write_text(json.dumps(stored))
    weights = (tmp_path / "other" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"save_dir .*other holds a model that is not a quantized one"):
        quantize(tiny_vit, "w8a8", save_dir=tmp_path / "other")
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("bits, symmetric", [("w8a16", False), ("w4a16", False), ("w4a16", True)])
def test_the_export_makes_compressed_tensors_warn_nothing(tmp_path, bits, symmetric):
    # compressed-tensors logs with loguru: a format forced on the whole model that differs from the one it infers made
    # it warn "... does not match the inferred format pack-quantized. Compression may fail" for a lossless export
    from loguru import logger

    qmodel = quantize(tiny_vit, config=DFQConfig(bits=bits, weight_symmetric=symmetric))
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        qmodel.save_pretrained(tmp_path, format="compressed-tensors")
    finally:
        logger.remove(sink)
    assert warnings == []


def test_unexpressible_configs_raise_naming_the_loss(tmp_path):
    with pytest.raises(ConfigError) as info:
        quantize(tiny_vit, "w4a4").save_pretrained(tmp_path, format="compressed-tensors")
    message = str(info.value)
    assert "attention quantizers (Q, K, softmax output, V) of 2 attention module(s)" in message
    assert "image-input quantizer of the patch embedding vit.embeddings.patch_embeddings.projection" in message
    assert "bit-exactness of the" in message and "exact=False" in message
    assert not (tmp_path / "config.json").exists()

    swin = quantize(tiny_swin, config=DFQConfig(bits="w8a8", **LINEAR_ONLY))
    with pytest.raises(ConfigError, match="bias that re-parameterisation added to swin.encoder.layers.0.downsample"):
        export_compressed_tensors(swin, tmp_path, exact=False)
    corrected = quantize(tiny_vit, config=DFQConfig(bits="w4a16", correction={"kind": "ridge"}))
    with pytest.raises(ConfigError, match=r"activation corrections attached to the inputs of 12 Linear\(s\)"):
        export_compressed_tensors(corrected, tmp_path)
    with pytest.raises(ConfigError, match="Unknown save format 'onnx'"):
        swin.save_pretrained(tmp_path, format="onnx")



def test_a_zero_point_int8_cannot_hold_is_refused(tmp_path):
    # a classifier row of positive weights: at 8 bits its zero point is far below 0 and, stored in compressed-tensors'
    # int8 zero point, wrapped around: plain transformers then predicted that class 30% off, silently
    def positive_row():
        model = tiny_vit()
        with torch.no_grad():
            model.classifier.weight[3] = model.classifier.weight[3].abs() + 0.05
        return model

    qmodel = quantize(positive_row, "w8a16")
    assert float(qmodel.classifier.weight_quantizer.zero_point.flatten()[3]) - 128 < -128
    with pytest.raises(ConfigError, match=r"zero points of classifier\.weight: outside the int8 range"):
        qmodel.save_pretrained(tmp_path, format="compressed-tensors")
    assert not (tmp_path / "config.json").exists()

def _linear_only_w8a8():
    return quantize(tiny_vit, config=DFQConfig(bits="w8a8", **LINEAR_ONLY))


def _activation_quantizers(qmodel) -> list[UniformQuantizer]:
    weights = {id(m.weight_quantizer) for m in qmodel.modules() if hasattr(m, "weight_quantizer")}
    return [m for m in qmodel.modules() if isinstance(m, UniformQuantizer) and id(m) not in weights]


def test_only_asymmetric_linear_input_quantizers_block_an_exact_export():
    # compressed-tensors adds its (signed) zero point before rounding; with the symmetric one, 0, that is our rounding
    qmodel = _linear_only_w8a8()
    activations = _activation_quantizers(qmodel)
    assert activations
    for quantizer in activations:
        quantizer.set_params(quantizer.scale, torch.full_like(quantizer.zero_point, 128.0))
    assert compressed_tensors_blockers(qmodel) == []
    qmodel.classifier.input_quantizer.set_params(qmodel.classifier.input_quantizer.scale, torch.tensor(127.0))
    problems = compressed_tensors_blockers(qmodel)
    assert len(problems) == 1 and problems[0].startswith("bit-exactness of the 1 asymmetric Linear input quantizer(s)")
    assert compressed_tensors_blockers(qmodel, exact=False) == []


def test_zero_points_are_refused_exactly_where_int8_cannot_hold_them():
    # compressed-tensors stores zero point - 2^(bits-1) in int8: -128..127 fit, one step beyond does not
    qmodel = quantize(tiny_vit, "w4a16")
    weights = qmodel.classifier.weight_quantizer
    original = weights.zero_point.clone()

    def weight_zero_points(first: float, second: float) -> list[str]:
        zero_point = original.clone().flatten()
        zero_point[:2] = torch.tensor([first, second])
        weights.set_params(weights.scale, zero_point)
        return compressed_tensors_blockers(qmodel)

    assert weight_zero_points(8 - 128, 8 + 127) == []
    for first, second in [(8 - 129, 8), (8, 8 + 128)]:
        problems = weight_zero_points(first, second)
        assert len(problems) == 1 and problems[0].startswith("the zero points of classifier.weight: outside the int8")

    qmodel = _linear_only_w8a8()
    fc2 = qmodel.get_submodule("vit.layers.0.mlp.fc2").input_quantizer
    for zero_point, fits in [(0.0, True), (255.0, True), (-3.0, False)]:  # -3: a range above 0
        fc2.set_params(fc2.scale, torch.tensor(zero_point))
        problems = compressed_tensors_blockers(qmodel, exact=False)
        if fits:
            assert problems == []
        else:
            assert len(problems) == 1 and problems[0].startswith("the zero points of vit.layers.0.mlp.fc2.input:")


def test_what_compressed_tensors_has_no_place_for_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="ViTForImageClassification is not an optimum_dfq quantized model"):
        export_compressed_tensors(tiny_vit(), tmp_path)

    per_channel = quantize(tiny_vit, config=DFQConfig(bits="w8a8", post_layernorm="per_channel", **LINEAR_ONLY))
    with pytest.raises(ConfigError, match=r"per-channel output quantizers of 4 LayerNorm\(s\)"):  # 2 blocks x 2
        export_compressed_tensors(per_channel, tmp_path, exact=False)

    qmodel = _linear_only_w8a8()
    qmodel.classifier.input_quantizer = None  # one scheme quantizes the inputs of every Linear
    problems = compressed_tensors_blockers(qmodel, exact=False)
    assert len(problems) == 1 and problems[0].startswith("unquantized inputs of classifier in a model whose other")

    qmodel = quantize(tiny_vit, "w4a16")
    qmodel.vit.stray = UniformQuantizer(8)
    assert compressed_tensors_blockers(qmodel) == ["quantizers compressed-tensors has no place for: vit.stray"]
    assert not (tmp_path / "config.json").exists()


def test_save_pretrained_arguments_reach_the_export(tmp_path, pixels):
    from transformers import AutoModelForImageClassification

    qmodel = quantize(tiny_vit, "w8a16")
    qmodel.save_pretrained(tmp_path, format="compressed-tensors", max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(logits(AutoModelForImageClassification.from_pretrained(tmp_path), pixels[0]),
                       logits(qmodel, pixels[0]))


def test_missing_package_is_named(monkeypatch, tmp_path):
    qmodel = quantize(tiny_vit, "w4a16")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(ImportError, match=r"optimum-dfq\[compressed-tensors\]"):
        export_compressed_tensors(qmodel, tmp_path)
