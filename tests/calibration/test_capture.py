"""Recording intermediate tensors with forward hooks: what is recorded, how many rows, and what is left behind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optimum_dfq import DFQConfig
from optimum_dfq.calibration import CalibrationSet, quantize_model
from optimum_dfq.calibration.capture import (
    capture_block_calls,
    capture_block_outputs,
    capture_matmul_inputs,
    capture_module_inputs,
)
from optimum_dfq.calibration.correction import AffineCorrection
from optimum_dfq.models import get_adapter
from optimum_dfq.nn import QLinear

from ..conftest import tiny_vit


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    calibration = CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32))
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4", input_range="calibrated"))
    return model


def hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def linear_outputs(model, names, pixels):
    outputs = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: outputs.setdefault(n, out))
               for n in names]
    with torch.no_grad():
        model(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    return outputs


def test_captured_rows_are_exactly_what_each_matmul_multiplies(quantized):
    """Through the quantized weight and the bias, the captured rows give the Linear's output: they come after the
    input quantizer and the input correction (or are the plain input of a Linear without them)."""
    linears = {name: m for name, m in quantized.named_modules() if isinstance(m, QLinear)}
    with_correction, with_quantizer = [n for n, m in linears.items() if m.input_quantizer is not None][:2]
    without_quantizer = next(n for n, m in linears.items() if m.input_quantizer is None)
    correction = AffineCorrection(linears[with_correction].in_features)
    correction.scale.uniform_(0.5, 1.5)
    correction.shift.normal_()
    linears[with_correction].input_correction = correction
    try:
        pixels = torch.randn(2, 3, 32, 32)
        names = [with_correction, with_quantizer, without_quantizer]
        rows = capture_matmul_inputs(quantized, names, [pixels], max_rows=10**6)
        outputs = linear_outputs(quantized, names, pixels)
    finally:
        linears[with_correction].input_correction = None
    for name in names:
        linear = linears[name]
        with torch.no_grad():
            recomputed = F.linear(rows[name], linear.quantized_weight(), linear.bias)
        torch.testing.assert_close(recomputed, outputs[name].reshape(-1, linear.out_features))


@pytest.mark.parametrize("max_rows", [10, 50])
def test_about_max_rows_rows_are_kept_over_all_batches(quantized, max_rows):
    name = next(n for n, m in quantized.named_modules() if isinstance(m, QLinear))
    batches = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    tokens = 17  # 16 patches and the class token
    stride = math.ceil(3 * tokens * len(batches) / max_rows)
    every_row = capture_matmul_inputs(quantized, [name], batches, max_rows=10**6)[name]
    rows = capture_matmul_inputs(quantized, [name], batches, max_rows=max_rows)[name]
    assert max_rows / 2 < rows.shape[0] <= max_rows + len(batches)  # each batch may round up by one row
    per_batch = every_row.split(3 * tokens)
    torch.testing.assert_close(rows, torch.cat([batch[::stride] for batch in per_batch]))


def test_a_smaller_last_batch_is_sampled_with_the_same_stride(quantized):
    """Every image contributes alike: the stride comes from the rows per image and the number of images, not from the
    size of the batch being recorded (a last batch of one image is not sampled three times more densely)."""
    name = next(n for n, m in quantized.named_modules() if isinstance(m, QLinear))
    batches = [torch.randn(3, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    tokens, max_rows = 17, 10
    stride = math.ceil(tokens * 4 / max_rows)
    every_row = capture_matmul_inputs(quantized, [name], batches, max_rows=10**6)[name]
    rows = capture_matmul_inputs(quantized, [name], batches, max_rows=max_rows)[name]
    per_batch = every_row.split([3 * tokens, tokens])
    torch.testing.assert_close(rows, torch.cat([batch[::stride] for batch in per_batch]))
    assert rows.shape[0] == math.ceil(3 * tokens / stride) + math.ceil(tokens / stride)


def test_rows_are_float32_whatever_the_model_dtype():
    model = tiny_vit().to(torch.bfloat16)
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    rows = capture_matmul_inputs(model, [name], [torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)], max_rows=100)
    assert rows[name].dtype == torch.float32
    inputs = capture_module_inputs(model, {name: model.get_submodule(name)}, [torch.randn(1, 3, 32, 32,
                                                                                           dtype=torch.bfloat16)], 100)
    assert inputs[name].dtype == torch.float32


def test_capture_module_inputs_records_inputs_not_outputs(quantized):
    name, norm = next((n, m) for n, m in quantized.named_modules() if isinstance(m, torch.nn.LayerNorm))
    pixels = torch.randn(1, 3, 32, 32)
    seen = []
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        quantized(pixel_values=pixels)
    handle.remove()
    rows = capture_module_inputs(quantized, {name: norm}, [pixels], max_rows=10**6)
    torch.testing.assert_close(rows[name], seen[0].reshape(-1, seen[0].shape[-1]))


def test_stop_after_ends_each_forward_pass_and_no_hook_is_left(quantized):
    """Capturing up to one Linear costs the prefix only: later modules (here the classifier) never run."""
    linears = [n for n, m in quantized.named_modules() if isinstance(m, QLinear)]
    first, classifier = linears[0], quantized.get_submodule(linears[-1])
    calls = []
    handle = classifier.register_forward_pre_hook(lambda m, args: calls.append(1))
    hooks = hooks_left(quantized)
    try:
        batches = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32)]
        rows = capture_matmul_inputs(quantized, [first], batches, max_rows=10**6, stop_after=first)
        assert rows[first].shape[0] == 3 * 17 and calls == []  # every batch recorded, none ran to the end
        block_name, block = get_adapter(quantized).blocks(quantized)[0]
        outputs = capture_block_outputs(quantized, block, batches)
        calls_captured = capture_block_calls(quantized, block, batches)
        assert outputs.shape[0] == calls_captured.num_images == 3 and calls == []
        capture_module_inputs(quantized, {block_name: block}, batches, max_rows=10)
        assert hooks_left(quantized) == hooks
    finally:
        handle.remove()


class _ScaledBlock(torch.nn.Module):
    def forward(self, x, bias, hidden_states=None, scale=1.0):
        return (x + bias) * scale + (0 if hidden_states is None else hidden_states)


class _ToyModel(torch.nn.Module):
    """Calls its block with a batched positional tensor, a tensor that is not batched (4 values, whatever the batch),
    a batched keyword tensor and a plain keyword, as transformers blocks get masks, biases and flags."""

    def __init__(self):
        super().__init__()
        self.block = _ScaledBlock()
        self.register_buffer("bias", torch.arange(4.0))

    def forward(self, pixel_values):
        x = pixel_values.flatten(1)[:, :4]
        return self.block(x, self.bias, hidden_states=2 * x, scale=3.0)


def test_block_calls_merge_batched_arguments_only_and_replay_any_images():
    model = _ToyModel()
    batches = [torch.randn(2, 3, 2, 2), torch.randn(3, 3, 2, 2)]  # sizes 2 and 3, neither equal to the bias's 4
    calls = capture_block_calls(model, model.block, batches)
    assert calls.num_images == 5
    pixels = torch.cat(batches)
    expected = model(pixels)
    torch.testing.assert_close(calls.replay(model.block), expected)
    index = torch.tensor([4, 0, 2])  # images from both batches, out of order
    torch.testing.assert_close(calls.replay(model.block, index), expected[index])
