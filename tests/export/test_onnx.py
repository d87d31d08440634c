"""ONNX export: QDQ lowering, integer weights, MatMulNBits packing, the report, and ONNX Runtime parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_dfq import DataFreeViTQuantizer, DFQConfig, DFQError
from optimum_dfq.export import to_onnx
from optimum_dfq.export.onnx_ops import LogQDQ, LogQDQSpec, pack_matmul_nbits
from optimum_dfq.quantizers import Log2Quantizer, LogSqrt2Quantizer, Quantizer

from ..conftest import TINY_MODELS

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.usefixtures("single_thread")


def _quantize(family: str, bits: str, calibration: torch.Tensor, **overrides):
    model = TINY_MODELS[family]()
    config = DFQConfig(bits=bits, num_images=len(calibration), calibration_batch_size=len(calibration), **overrides)
    return DataFreeViTQuantizer(model).quantize(config=config, calibration_dataset=calibration)


def _run(path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixels.numpy()})[0]


@pytest.fixture(scope="module")
def calibration(request):
    cifar = request.getfixturevalue("cifar_test_pixels")
    return cifar[200:216]  # test images as calibration is fine here: no accuracy is measured


@pytest.mark.parametrize("family", ["vit", "deit_teacher", "swin"])
@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
def test_onnxruntime_matches_pytorch_and_report_lists_every_quantizer(family, bits, calibration, cifar_test_pixels,
                                                                      tmp_path):
    qmodel = _quantize(family, bits, calibration)
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    pixels = cifar_test_pixels[:32]
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels).logits.numpy()
    got = _run(tmp_path / "model.onnx", pixels)
    diff = np.abs(got - expected)
    # Stated tolerance: ONNX Runtime's float kernels (fused LayerNorm, GELU, Exp) differ from PyTorch's in the last
    # bits; where such a difference crosses a rounding boundary one code moves by one step.
    assert diff.mean() < 1e-2 * np.abs(expected).mean(), diff.mean()
    assert diff.max() < 0.1 * np.abs(expected).max(), diff.max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9

    quantizer_names = {name for name, m in qmodel.named_modules() if isinstance(m, Quantizer)}
    assert {q.name for q in report.quantizers} == quantizer_names
    assert report.num_integer + report.num_float == len(quantizer_names)
    floats = {q.kind for q in report.quantizers if not q.integer}
    # the default post-softmax quantizer (TanQ at 8 bits, log-sqrt2 below) runs as float ops; the rest is integer
    assert floats == ({"tanq"} if bits == "w8a8" else {"log_sqrt2"})
    assert report.integer_operators > 0 and report.max_abs_logit_diff is not None


def test_w8a8_linears_run_as_integer_matmuls(calibration, tmp_path):
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    assert all(q.integer for q in report.quantizers)  # uniform post-softmax: the whole graph is QDQ
    linears_in_blocks = 6 * qmodel.config.num_hidden_layers  # q, k, v, out, fc1, fc2
    attention_matmuls = 2 * qmodel.config.num_hidden_layers  # Q·Kᵀ and A·V
    fused = report.ort_operators.get("MatMulIntegerToFloat", 0) + report.ort_operators.get("QLinearMatMul", 0)
    assert fused >= linears_in_blocks + attention_matmuls
    assert report.ort_operators.get("MatMul", 0) == 0


def test_four_bit_weights_are_packed_with_matmul_nbits(calibration, tmp_path):
    qmodel = _quantize("vit", "w4a8", calibration)
    nbits = to_onnx(qmodel, tmp_path / "nbits.onnx")
    int8 = to_onnx(qmodel, tmp_path / "int8.onnx", weight_only_int4=False)
    graph = onnx.load(tmp_path / "nbits.onnx").graph
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == 6 * 2 + 1  # every Linear incl. classifier
    assert any("MatMulNBits" in q.lowering for q in nbits.quantizers)
    assert nbits.file_size < int8.file_size
    np.testing.assert_allclose(_run(tmp_path / "nbits.onnx", calibration[:4]),
                               _run(tmp_path / "int8.onnx", calibration[:4]), atol=1e-4)


def _dequantized_weights(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codes, zero point) of every integer constant feeding a `DequantizeLinear` (the weights; activations come
    from QuantizeLinear)."""
    graph = onnx.load(path).graph
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return [(constants[node.input[0]], constants[node.input[2]]) for node in graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in constants]


def _dequantized_weight_codes(path) -> list[np.ndarray]:
    return [codes for codes, _ in _dequantized_weights(path)]


@pytest.mark.parametrize("weight_bits", [8, 7, 6, 4])
def test_integer_weights_cannot_saturate_u8s8_kernels(weight_bits, calibration, tmp_path):
    """ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2) add pairs of products in int16 with
    saturation, so an int8 weight code beyond [-64, 63] can silently change the result (seen here: top-1 agreement
    0.5 on an AVX2 CPU). 8-bit codes must therefore be stored as uint8 (uint8 x uint8 kernels widen first), narrower
    ones as int8 centred on zero. Checked on the file, so it holds whatever CPU runs the test."""
    qmodel = _quantize("vit", f"w{weight_bits}a8", calibration)
    to_onnx(qmodel, tmp_path / "model.onnx", weight_only_int4=False)
    codes = _dequantized_weight_codes(tmp_path / "model.onnx")
    assert len(codes) == 6 * qmodel.config.num_hidden_layers + 2  # block Linears, classifier, patch-embedding conv
    for array in codes:
        if weight_bits == 8:
            assert array.dtype == np.uint8
        else:
            assert array.dtype == np.int8 and array.min() >= -64 and array.max() <= 63
    assert max(int(array.max()) - int(array.min()) for array in codes) == 2**weight_bits - 1


def test_signed_weights_opt_in_stores_8_bit_codes_as_int8_with_the_same_values(calibration, tmp_path):
    """`signed_weights=True` (for VNNI CPUs) shifts codes and zero points by 128: the dequantized weights are equal."""
    qmodel = _quantize("vit", "w8a8", calibration)
    to_onnx(qmodel, tmp_path / "u8.onnx", verify=False)
    to_onnx(qmodel, tmp_path / "s8.onnx", verify=False, signed_weights=True)
    unsigned, signed = _dequantized_weights(tmp_path / "u8.onnx"), _dequantized_weights(tmp_path / "s8.onnx")
    assert len(unsigned) == len(signed) == 6 * qmodel.config.num_hidden_layers + 2
    for (u_codes, u_zp), (s_codes, s_zp) in zip(unsigned, signed):
        assert (u_codes.dtype, u_zp.dtype, s_codes.dtype, s_zp.dtype) == (np.uint8, np.uint8, np.int8, np.int8)
        np.testing.assert_array_equal(u_codes.astype(np.int16) - 128, s_codes)
        np.testing.assert_array_equal(u_zp.astype(np.int16) - 128, s_zp)


@pytest.mark.parametrize("k,block_size", [(64, 32), (40, 16), (100, 128)])
def test_pack_matmul_nbits_layout(k, block_size):
    rng = np.random.default_rng(0)
    n = 6
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    scale, zero_point = rng.random(n).astype(np.float32) + 0.1, rng.integers(0, 16, size=n)
    packed, scales, zps = pack_matmul_nbits(codes, scale, zero_point, block_size)
    n_blocks = -(-k // block_size)
    assert packed.shape == (n, n_blocks, block_size // 2)
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(unpacked, codes)
    np.testing.assert_array_equal(scales.reshape(n, n_blocks), np.repeat(scale[:, None], n_blocks, axis=1))
    zp_unpacked = np.stack([zps.reshape(n, -1) & 0x0F, zps.reshape(n, -1) >> 4], axis=-1).reshape(n, -1)
    np.testing.assert_array_equal(zp_unpacked[:, :n_blocks], np.repeat(zero_point[:, None], n_blocks, axis=1))


@pytest.mark.parametrize("cls,bits", [(LogSqrt2Quantizer, 3), (LogSqrt2Quantizer, 4), (LogSqrt2Quantizer, 8),
                                      (Log2Quantizer, 3), (Log2Quantizer, 8)])
def test_log_quantizer_lowering_matches_pytorch_bit_for_bit(cls, bits, tmp_path):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 2, 16, 16) * 4, dim=-1)
    probs[0, 0, 0, :3] = 0.0
    quantizer = cls(bits)
    quantizer.set_mode("observe")
    quantizer(probs)
    quantizer.calibrate()
    quantizer.set_mode("quantize")
    scale = float(quantizer.scale)
    spec = LogQDQSpec(scale, bits, 2 if cls is LogSqrt2Quantizer else 1,
                      lambda x: quantizer._quant_dequant(x, torch.tensor(scale)))

    class Wrapper(torch.nn.Module):
        def forward(self, x):
            return LogQDQ.apply(x, spec)

    torch.onnx.export(Wrapper(), (probs,), str(tmp_path / "log.onnx"), dynamo=False, input_names=["x"])
    got = ort.InferenceSession(str(tmp_path / "log.onnx")).run(None, {"x": probs.numpy()})[0]
    expected = quantizer(probs).numpy()
    # exact: an output one unit in the last place off (the former `Exp` form, on most values) moves whole steps of
    # the quantizers downstream where a value sits on a rounding boundary (tiny Swin, W3A3, log2: 17% of the logits)
    np.testing.assert_array_equal(got, expected)
    if cls is LogSqrt2Quantizer:
        assert (expected == 0).any()


def test_reloaded_checkpoint_exports_like_the_in_memory_model(calibration, tmp_path):
    from transformers import AutoModelForImageClassification

    qmodel = _quantize("deit_teacher", "w4a8", calibration)
    qmodel.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt")
    to_onnx(qmodel, tmp_path / "a.onnx", verify=False)
    to_onnx(reloaded, tmp_path / "b.onnx", verify=False)
    first, second = _run(tmp_path / "a.onnx", calibration[:4]), _run(tmp_path / "b.onnx", calibration[:4])
    np.testing.assert_array_equal(first, second)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DFQError, match="no quantized layers"):
        to_onnx(TINY_MODELS["vit"](), tmp_path / "x.onnx")
    with pytest.raises(DFQError, match="power of two"):
        to_onnx(TINY_MODELS["vit"](), tmp_path / "x.onnx", block_size=24)
    # QuantizeLinear/DequantizeLinear with an axis need opset 13: lower ones wrote a file ONNX Runtime cannot load
    with pytest.raises(DFQError, match=r"opset=11 .* at least 13"):
        to_onnx(TINY_MODELS["vit"](), tmp_path / "x.onnx", opset=11)
    # a string (e.g. from a config file) reached `<` with a TypeError
    with pytest.raises(DFQError, match=r"block_size='128' must be an integer"):
        to_onnx(TINY_MODELS["vit"](), tmp_path / "x.onnx", block_size="128")
    with pytest.raises(DFQError, match=r"opset='17' must be an integer"):
        to_onnx(TINY_MODELS["vit"](), tmp_path / "x.onnx", opset="17")
    assert not (tmp_path / "x.onnx").exists()



@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])  # uint8 container / MatMulNBits
def test_a_weight_zero_point_outside_the_code_range_is_refused(bits, calibration, tmp_path):
    # a classifier row of positive weights: its calibrated range excludes 0, so its zero point is negative; the
    # containers' zero points wrapped around, and ONNX Runtime's logit for that class silently differed
    model = TINY_MODELS["vit"]()
    with torch.no_grad():
        model.classifier.weight[3] = model.classifier.weight[3].abs() + 0.05
    config = DFQConfig(bits=bits, num_images=len(calibration), calibration_batch_size=len(calibration))
    qmodel = DataFreeViTQuantizer(model).quantize(config=config, calibration_dataset=calibration)
    assert float(qmodel.classifier._packable_quantizer().zero_point.flatten()[3]) < 0
    with pytest.raises(DFQError, match=r"classifier: .* 1 of its output channels \(first: 3.*weight_symmetric=True"):
        to_onnx(qmodel, tmp_path / "x.onnx", verify=False)
    assert not (tmp_path / "x.onnx").exists()

def test_half_precision_model_is_refused_with_the_fix(calibration, tmp_path):
    from transformers import AutoModelForImageClassification

    _quantize("vit", "w8a8", calibration).save_pretrained(tmp_path / "ckpt")
    half = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt", dtype=torch.float16)
    with pytest.raises(DFQError, match=r"float16 tensors.*without dtype="):
        to_onnx(half, tmp_path / "x.onnx", verify=False)
    assert not (tmp_path / "x.onnx").exists()


def test_non_square_images_export(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=[32, 48], patch_size=8, hidden_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                num_labels=10)).eval()
    pixels = torch.randn(4, 3, 32, 48)
    qmodel = DataFreeViTQuantizer(model).quantize(bits="w8a8", calibration_dataset=pixels)
    report = to_onnx(qmodel, tmp_path / "wide.onnx")
    assert report.top1_agreement == 1.0 and report.max_abs_logit_diff < 1e-3
    with torch.no_grad():
        np.testing.assert_allclose(_run(tmp_path / "wide.onnx", pixels), qmodel(pixel_values=pixels).logits.numpy(),
                                   atol=1e-3)


@pytest.mark.parametrize("bits", ["w4a16", "w8a16"])
def test_weight_only_models_export(bits, calibration, tmp_path):
    qmodel = _quantize("swin", bits, calibration)
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    assert {q.role for q in report.quantizers} == {"weight"}
    uses_nbits = any(node.op_type == "MatMulNBits" for node in onnx.load(tmp_path / "model.onnx").graph.node)
    assert uses_nbits == (bits == "w4a16")
    # 4-bit MatMulNBits nodes of the file compute in float (accuracy_level 0); the DequantizeLinear -> MatMul pairs
    # ONNX Runtime fuses at 8 bits run with int8 activations (accuracy_level 4): only those are integer matmuls
    nbits = report.ort_operators["MatMulNBits"]
    assert report.integer_operators == (0 if bits == "w4a16" else nbits)
    assert report.float_matmuls >= (nbits if bits == "w4a16" else 0)
    # ONNX Runtime fuses the weights' DequantizeLinear -> MatMul (uint8 at 8 bits, int8 below) into MatMulNBits and,
    # by default, computes it with int8 activations (session.qdq_matmulnbits_accuracy_level = 4); at level 0 the
    # weight-only model is exact
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    pixels = calibration[:4]
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(session.run(["logits"], {"pixel_values": pixels.numpy()})[0], expected, atol=1e-4)


def test_pixel_grid_input_exports_and_matches_onnxruntime(calibration, cifar_test_pixels, image_processor, tmp_path):
    model = TINY_MODELS["vit"]()
    config = DFQConfig(bits="w8a8", num_images=len(calibration), calibration_batch_size=len(calibration))
    qmodel = DataFreeViTQuantizer(model, image_processor).quantize(config=config, calibration_dataset=calibration)
    assert qmodel.config.quantization_config.input_range == "pixels"
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    kinds = {q.name: q.kind for q in report.quantizers if not q.integer}
    image_input = [name for name in kinds if name.endswith("patch_embeddings.projection.input_quantizer")]
    assert len(image_input) == 1 and kinds[image_input[0]] == "pixel_grid"  # fractional zero points: float ops
    assert set(kinds.values()) == {"pixel_grid", "tanq"}
    assert next(q.note for q in report.quantizers if q.name == image_input[0]).startswith("pixel grid: ")
    pixels = cifar_test_pixels[:32]
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels).logits.numpy()
    got = _run(tmp_path / "model.onnx", pixels)
    assert np.abs(got - expected).mean() < 1e-2 * np.abs(expected).mean()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_float_emulated_activations_are_warned_about_with_the_integer_fix(calibration, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="optimum_dfq.export.onnx"):
        to_onnx(_quantize("vit", "w8a8", calibration), tmp_path / "default.onnx", verify=False)  # TanQ softmax
    assert "tanq x2" in caplog.text and "post_softmax='uniform', input_range='calibrated'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_dfq.export.onnx"):
        to_onnx(_quantize("vit", "w8a8", calibration, post_softmax="uniform"), tmp_path / "int.onnx", verify=False)
    assert "float operations" not in caplog.text


def test_the_integer_fix_named_for_a_low_bit_model_is_its_own_preset_and_works(calibration, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="optimum_dfq.export.onnx"):
        to_onnx(_quantize("vit", "w4a4", calibration), tmp_path / "default.onnx", verify=False)  # log-sqrt2 softmax
    assert "log_sqrt2 x2" in caplog.text and "DFQConfig(bits='w4a4', post_softmax='uniform'" in caplog.text
    assert "cost accuracy below 8 bits" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_dfq.export.onnx"):
        report = to_onnx(_quantize("vit", "w4a4", calibration, post_softmax="uniform", input_range="calibrated"),
                         tmp_path / "int.onnx", verify=False)
    assert "float operations" not in caplog.text
    assert all(q.integer for q in report.quantizers if q.role == "activation")


def test_integer_recipe_exports_every_quantizer_as_integers(calibration, image_processor, tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "w8a8_integer_onnx.yaml"
    config = DFQConfig.from_yaml(recipe).replace(num_images=len(calibration), calibration_batch_size=len(calibration))
    qmodel = DataFreeViTQuantizer(TINY_MODELS["deit_teacher"](), image_processor).quantize(
        config=config, calibration_dataset=calibration)  # with an image processor: still a calibrated input range
    report = to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
    assert all(q.integer for q in report.quantizers), [q for q in report.quantizers if not q.integer]


def test_zero_point_outside_the_codes_is_emulated_in_float_and_reported(calibration, tmp_path, caplog):
    import json

    from optimum_dfq.quantizers import UniformQuantizer

    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")  # otherwise an all-integer graph
    name = "vit.layers.0.mlp.fc2.input_quantizer"
    shifted = qmodel.get_submodule(name)
    assert type(shifted) is UniformQuantizer and not shifted.per_channel
    shifted.set_params(shifted.scale, torch.tensor(-3.0))  # a range above 0: no uint8 zero point expresses it
    with caplog.at_level("WARNING", logger="optimum_dfq.export.onnx"):
        report = to_onnx(qmodel, tmp_path / "model.onnx")
    assert "1 activation quantizer(s) are exported as float operations (uniform x1)" in caplog.text
    floats = [q for q in report.quantizers if not q.integer]
    assert [(q.name, q.lowering, q.note) for q in floats] == [
        (name, "float emulation", "zero point outside the uint8 code range")]
    with torch.no_grad():
        logits = qmodel(pixel_values=calibration[:4]).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", calibration[:4]), logits, atol=1e-2 * np.abs(logits).max())
    assert report.max_abs_logit_diff < 1e-2 * np.abs(logits).max() and report.num_probe_images == 8

    summary = report.summary().splitlines()
    assert summary[0] == f"ONNX model: {tmp_path / 'model.onnx'} ({report.file_size / 1e6:.2f} MB)"
    total = len(report.quantizers)
    assert summary[1] == f"quantizers: {total} ({total - 1} as integers, 1 emulated in float)"
    assert "     1 x float emulation" in summary
    assert "  float: uniform 8-bit (zero point outside the uint8 code range)" in summary
    assert f"onnxruntime runs {report.integer_operators} integer matmul/conv operator(s) and " in summary[-2]
    assert summary[-1].startswith("onnxruntime vs PyTorch on 8 probe image(s): max |logit diff| = ")
    report.save(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == report.to_dict() and saved["quantizers"][0] == vars(report.quantizers[0])


@pytest.mark.parametrize("bits", ["w8a8", "w6a6"])
def test_per_channel_post_layernorm_quantizers_export_and_run(bits, calibration, tmp_path):
    # ONNX Runtime fuses DQ(activation) -> MatMul into MatMulIntegerToFloat, which takes one activation zero point:
    # a per-channel activation QDQ made a graph that failed at run time ("Per-Channel is not supported yet")
    qmodel = _quantize("vit", bits, calibration, post_layernorm="per_channel")
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    per_channel = [q for q in report.quantizers if q.name.endswith("layernorm_before.output_quantizer")]
    assert per_channel and all(not q.integer and q.lowering == "float emulation" for q in per_channel)
    assert all("per-channel" in q.note for q in per_channel)
    pixels = calibration[:4]
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels).logits.numpy()
    assert (_run(tmp_path / "model.onnx", pixels).argmax(-1) == expected.argmax(-1)).mean() >= 0.75  # it runs
    # their consumers take float inputs, so ONNX Runtime runs them as MatMulNBits with (by default) int8 dynamic
    # activations, like weight-only models; with float activations the graph reproduces PyTorch
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"pixel_values": pixels.numpy()})[0], expected, atol=1e-4)


def test_float_reasons_in_the_summary_are_readable_and_true(calibration, tmp_path):
    """A 3-bit log2 quantizer was listed as "log23", and a fractional zero point (round_zero_point=False) as a zero
    point "outside the uint8 code range"."""
    qmodel = _quantize("vit", "w4a4", calibration, post_softmax="log2", round_zero_point=False)
    report = to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
    summary = report.summary().splitlines()
    assert "  float: log2 4-bit (no exact ONNX QDQ form for a logarithmic codebook)" in summary
    fractional = [q for q in report.quantizers if q.kind == "uniform" and not q.integer]
    assert fractional and all(q.note == "fractional zero point (round_zero_point=False): no uint8 QDQ form"
                              for q in fractional)
    assert "outside" not in report.summary()


def test_probe_images_are_checked_before_exporting(calibration, tmp_path):
    """Probe images of another size, an empty batch or a NumPy array failed inside ONNX Runtime after the export."""
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    for probes, problem in [(torch.zeros(2, 3, 64, 64), r"\[2, 3, 64, 64\]"), (torch.zeros(0, 3, 32, 32), "none"),
                            (torch.zeros(3, 32, 32), r"\[3, 32, 32\]"), (np.zeros((2, 3, 32, 32)), "ndarray")]:
        with pytest.raises(DFQError, match=rf"probe_images.*{problem}.*\[N, 3, 32, 32\]"):
            to_onnx(qmodel, tmp_path / "model.onnx", probe_images=probes)
    # NaN probes verified "top-1 agreement 100%" on NaN logits, raw uint8 pixels verified the export on images the
    # model never sees (both without a word)
    nan = torch.zeros(2, 3, 32, 32)
    nan[1, 0, 0, 0] = float("nan")
    for probes, problem in [(nan, "NaN or inf"), ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "torch.uint8")]:
        with pytest.raises(DFQError, match=rf"probe_images.*{problem}.*image processor"):
            to_onnx(qmodel, tmp_path / "model.onnx", probe_images=probes)
    assert not (tmp_path / "model.onnx").exists()
    # a folder as the output failed inside torch's exporter, after the export work
    with pytest.raises(DFQError, match=r"is a folder; pass the \.onnx file to write"):
        to_onnx(qmodel, tmp_path)


def test_export_prints_no_alarming_native_warnings(calibration, tmp_path, capfd):
    """Every export printed ONNX Runtime's "Serializing optimized model ... hardware specific optimizations" warning
    (from the report's own optimised copy, which is never shipped) and, without 4-bit weights, the exporter's "Custom
    opset domain: 'com.microsoft' ... not used"."""
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    capfd.readouterr()
    to_onnx(qmodel, tmp_path / "model.onnx")
    err = capfd.readouterr().err
    assert "NchwcTransformer" not in err and "Custom opset domain" not in err
    assert all(opset.domain != "com.microsoft" for opset in onnx.load(tmp_path / "model.onnx").opset_import)


def test_quantizers_that_are_off_or_uncalibrated(calibration, tmp_path, caplog):
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")  # otherwise an all-integer graph
    name = "vit.layers.0.mlp.fc2.input_quantizer"
    qmodel.get_submodule(name).set_mode("off")  # the identity: nothing to lower, nothing emulated in float
    with caplog.at_level("WARNING", logger="optimum_dfq.export.onnx"):
        report = to_onnx(qmodel, tmp_path / "model.onnx")
    assert "float operations" not in caplog.text
    off = [q for q in report.quantizers if q.lowering == "off"]
    assert [(q.name, q.integer, q.note) for q in off] == [(name, False, "disabled")]
    assert report.num_float == 0 and report.num_integer == len(report.quantizers) - 1
    summary = report.summary()  # listed as off, not among the reasons for float operations
    assert "     1 x off" in summary.splitlines() and "float:" not in summary and "0 emulated in float" in summary
    with torch.no_grad():
        expected = qmodel(pixel_values=calibration[:4]).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", calibration[:4]), expected,
                               atol=3e-2 * np.abs(expected).max())  # a few codes round apart

    qmodel.get_submodule(name).calibrated.fill_(False)
    qmodel.get_submodule(name).set_mode("quantize")
    with pytest.raises(DFQError, match=rf"{name}: the quantizer is not calibrated"):
        to_onnx(qmodel, tmp_path / "uncalibrated.onnx", verify=False)
    qmodel.get_submodule(name).calibrated.fill_(True)
    weights = qmodel.classifier.weight_quantizer
    weights.set_mode("off")
    with pytest.raises(DFQError, match="classifier: its weight quantizer is off"):
        to_onnx(qmodel, tmp_path / "off.onnx", verify=False)
    weights.set_mode("quantize")
    weights.calibrated.fill_(False)
    with pytest.raises(DFQError, match="classifier: its weight quantizer is uncalibrated"):
        to_onnx(qmodel, tmp_path / "off.onnx", verify=False)
    assert not (tmp_path / "uncalibrated.onnx").exists() and not (tmp_path / "off.onnx").exists()


def test_export_leaves_the_model_as_it_was(calibration, tmp_path):
    # the lowering patches forwards for the export only; a training-mode model goes back to training mode
    qmodel = _quantize("vit", "w4a8", calibration)
    pixels = calibration[:4]
    with torch.no_grad():
        before = qmodel(pixel_values=pixels).logits
    qmodel.train()
    to_onnx(qmodel, tmp_path / "missing" / "folders" / "model.onnx", verify=False)  # missing folders are created
    assert qmodel.training and (tmp_path / "missing" / "folders" / "model.onnx").exists()
    assert not [name for name, module in qmodel.named_modules() if "forward" in vars(module)]
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(pixel_values=pixels).logits, before)


def test_option_bounds_and_matmul_nbits_blocks(calibration, tmp_path):
    qmodel = _quantize("vit", "w3a8", calibration)  # 3-bit weights go to 4-bit MatMulNBits containers too
    with pytest.raises(DFQError, match="power of two >= 16, got 8"):
        to_onnx(qmodel, tmp_path / "x.onnx", block_size=8)
    with pytest.raises(DFQError, match="must be an integer, got bool"):
        to_onnx(qmodel, tmp_path / "x.onnx", opset=True)
    report = to_onnx(qmodel, tmp_path / "model.onnx", block_size=16, opset=13)  # the smallest accepted values
    assert {q.lowering for q in report.quantizers if q.role == "weight" and "MatMulNBits" in q.lowering} == {
        "MatMulNBits (4-bit container, block 16)"}
    # no block wider than a row rounded up to a power of two: rows of 32 (hidden) and 64 (MLP) inputs
    report = to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
    blocks = {q.name: q.lowering for q in report.quantizers if "MatMulNBits" in q.lowering}
    assert blocks["vit.layers.0.mlp.fc2.weight_quantizer"] == "MatMulNBits (4-bit container, block 64)"
    assert blocks["vit.layers.0.mlp.fc1.weight_quantizer"] == "MatMulNBits (4-bit container, block 32)"
    assert len(blocks) == 6 * qmodel.config.num_hidden_layers + 1


def test_unfolded_corrections_export_as_float_matmuls(calibration, tmp_path):
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform", correction={"kind": "ridge"})
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    corrected = [name for name, m in qmodel.named_modules() if getattr(m, "input_correction", None) is not None]
    entries = [q for q in report.quantizers if q.kind == "correction"]
    assert corrected and [q.name for q in entries] == [f"{name}.input_correction" for name in corrected]
    assert {(q.lowering, q.integer, q.note) for q in entries} == {("float MatMul", False, "unfolded correction matrix")}
    for name in corrected:  # a correction far from the identity, so that one left out of the graph shows
        qmodel.get_submodule(name).input_correction.matrix.mul_(-1.0)
    report = to_onnx(qmodel, tmp_path / "model.onnx")
    with torch.no_grad():
        expected = qmodel(pixel_values=calibration[:4]).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", calibration[:4]), expected,
                               atol=3e-2 * np.abs(expected).max())  # a few codes round apart


def test_the_report_measures_the_given_probe_images(calibration, tmp_path):
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    probes = calibration[:5]
    report = to_onnx(qmodel, tmp_path / "model.onnx", probe_images=probes)
    with torch.no_grad():
        expected = qmodel(pixel_values=probes).logits.numpy()
    got = _run(tmp_path / "model.onnx", probes)
    assert report.num_probe_images == 5
    assert report.max_abs_logit_diff == pytest.approx(float(np.abs(got - expected).max()), rel=1e-6, abs=1e-9)
    assert report.top1_agreement == float((got.argmax(-1) == expected.argmax(-1)).mean())


def test_a_training_mode_model_is_verified_against_its_inference_logits(calibration, tmp_path):
    # the file holds the inference graph; the report compared it with a training-mode forward (dropout on), so a
    # faithful export of a training-mode model reported a random logit difference
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    dropouts = [m for m in qmodel.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for dropout in dropouts:
        dropout.p = 0.5
    probes = calibration[:5]
    qmodel.train()
    dropouts[0].eval()  # a mixed model: each module gets its own mode back
    report = to_onnx(qmodel, tmp_path / "model.onnx", probe_images=probes)
    assert qmodel.training and not dropouts[0].training and all(dropout.training for dropout in dropouts[1:])
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(pixel_values=probes).logits.numpy()
    got = _run(tmp_path / "model.onnx", probes)
    assert report.max_abs_logit_diff == pytest.approx(float(np.abs(got - expected).max()), rel=1e-6, abs=1e-9)


def test_the_report_counts_top1_disagreements(calibration, tmp_path):
    # a PyTorch forward that differs from the exported graph: the classifier's logits reversed outside the export
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")

    def reverse_outside_export(module, inputs, output):
        return output if torch.onnx.is_in_onnx_export() else output.flip(-1)

    qmodel.classifier.register_forward_hook(reverse_outside_export)
    probes = calibration[:8]
    report = to_onnx(qmodel, tmp_path / "model.onnx", probe_images=probes)
    with torch.no_grad():
        expected = qmodel(pixel_values=probes).logits.numpy()
    got = _run(tmp_path / "model.onnx", probes)
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    assert agreement < 1.0
    assert report.top1_agreement == agreement


def test_activation_zero_points_at_the_ends_of_the_code_range(calibration, tmp_path):
    # QDQ holds zero points 0..qmax (a range ending at 0 puts it at qmax); one past qmax is emulated in float
    qmodel = _quantize("vit", "w4a4", calibration, post_softmax="uniform", input_range="calibrated")
    name = "vit.layers.0.mlp.fc2.input_quantizer"
    quantizer = qmodel.get_submodule(name)
    assert quantizer.qmax == 15 and not quantizer.per_channel
    pixels = calibration[:4]
    for zero_point, lowering, note in [(15.0, "QuantizeLinear/DequantizeLinear uint8 (+Clip)", ""),
                                       (16.0, "float emulation", "zero point outside the uint8 code range")]:
        quantizer.set_params(quantizer.scale, torch.tensor(zero_point))
        report = to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
        entry = next(q for q in report.quantizers if q.name == name)
        assert (entry.lowering, entry.integer, entry.note) == (lowering, not note, note)
        with torch.no_grad():
            expected = qmodel(pixel_values=pixels).logits.numpy()
        np.testing.assert_allclose(_run(tmp_path / "model.onnx", pixels), expected, atol=1e-2 * np.abs(expected).max())


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])  # uint8 container / MatMulNBits
def test_weight_zero_points_at_the_ends_of_the_code_range(bits, calibration, tmp_path):
    # integer containers hold weight zero points 0..qmax (a row of weights <= 0 puts it at qmax); beyond qmax, or
    # between two codes, a zero point cannot be stored and the export is refused, naming the layer
    qmodel = _quantize("vit", bits, calibration, post_softmax="uniform")
    quantizer = qmodel.classifier.weight_quantizer
    assert quantizer.per_channel and quantizer.zero_point.numel() == qmodel.config.num_labels
    scale, zero_point = quantizer.scale.clone(), quantizer.zero_point.clone()
    zero_point.flatten()[3] = quantizer.qmax
    quantizer.set_params(scale, zero_point)
    to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
    pixels = calibration[:4]
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", pixels), expected, atol=1e-2 * np.abs(expected).max())

    zero_point.flatten()[3] = quantizer.qmax + 1
    quantizer.set_params(scale, zero_point)
    with pytest.raises(DFQError, match=rf"classifier: .* 1 of its output channels \(first: 3, zero point "
                                       rf"{quantizer.qmax + 1}\) lies outside the code range 0\.\.{quantizer.qmax}"):
        to_onnx(qmodel, tmp_path / "above.onnx", verify=False)
    # frozen codes need no re-quantization, so only the export's own check stands between a fractional zero point
    # and a truncated one in the file
    zero_point.flatten()[3] = quantizer.qmax - 0.5
    qmodel.classifier.freeze()
    quantizer.set_params(scale, zero_point)
    with pytest.raises(DFQError, match="classifier: the weight zero point is not an integer"):
        to_onnx(qmodel, tmp_path / "fractional.onnx", verify=False)
    assert not (tmp_path / "above.onnx").exists() and not (tmp_path / "fractional.onnx").exists()


def test_rows_narrower_than_sixteen_use_the_smallest_matmul_nbits_block(tmp_path):
    # MatMulNBits blocks are at least 16 wide: a row of 8 inputs is padded to one block of 16, not one of 8
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=16, num_labels=4)).eval()
    pixels = torch.randn(4, 3, 16, 16)
    qmodel = DataFreeViTQuantizer(model).quantize(bits="w4a8", calibration_dataset=pixels)
    report = to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
    blocks = {q.name: q.lowering for q in report.quantizers if "MatMulNBits" in q.lowering}
    assert len(blocks) == 6 + 1 and set(blocks.values()) == {"MatMulNBits (4-bit container, block 16)"}
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", pixels), expected, atol=1e-2 * np.abs(expected).max())


def test_a_conv_without_explicit_zero_padding_is_refused(calibration, tmp_path):
    # the Conv node takes explicit zero pads only; reflect/circular padding would be exported as zeros
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    conv = qmodel.vit.embeddings.patch_embeddings.projection
    conv.padding_mode = "reflect"
    with pytest.raises(DFQError, match=r"vit\.embeddings\.patch_embeddings\.projection: only zero padding"):
        to_onnx(qmodel, tmp_path / "model.onnx", verify=False)
    assert not (tmp_path / "model.onnx").exists()


def test_default_probe_images_are_eight_seeded_standard_normal_images(calibration, tmp_path):
    qmodel = _quantize("vit", "w8a8", calibration, post_softmax="uniform")
    seen = []

    def record(module, args, kwargs):
        if not torch.onnx.is_in_onnx_export():
            seen.append(kwargs["pixel_values"].clone())

    qmodel.register_forward_pre_hook(record, with_kwargs=True)
    first = to_onnx(qmodel, tmp_path / "model.onnx")
    second = to_onnx(qmodel, tmp_path / "model.onnx")
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # seeded: the same images every time
    assert seen[0].shape == (8, 3, 32, 32) and first.num_probe_images == 8
    assert abs(float(seen[0].mean())) < 0.1 and abs(float(seen[0].std()) - 1.0) < 0.1
    assert first.max_abs_logit_diff == second.max_abs_logit_diff



def test_a_matmul_nbits_node_without_accuracy_level_counts_as_float():
    from optimum_dfq.export.onnx import MATMUL_NBITS_INT8_ACCURACY, _accuracy_level

    # the attribute's schema default is 0 (float32 activations)
    node = onnx.helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=4,
                                 block_size=32)
    assert _accuracy_level(node) == 0
    node.attribute.append(onnx.helper.make_attribute("accuracy_level", MATMUL_NBITS_INT8_ACCURACY))
    assert _accuracy_level(node) == MATMUL_NBITS_INT8_ACCURACY
