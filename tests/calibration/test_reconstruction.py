"""Block-wise reconstruction: argument capture/replay, frozen quantizers, and lower block-output error."""

import math

import pytest
import torch

from optimum_dfq import ConfigError, DFQConfig, DFQError
from optimum_dfq.calibration import calibration_set_from_dataset, iter_quantizers, quantize_model, reconstruct_blocks
from optimum_dfq.calibration.capture import capture_block_calls, capture_block_outputs
from optimum_dfq.calibration.engine import float_reference
from optimum_dfq.models import get_adapter
from optimum_dfq.nn import QLinear

from ..conftest import TINY_MODELS, tiny_swin, tiny_vit

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def calibration(cifar_train, image_processor):
    return calibration_set_from_dataset(cifar_train, image_processor, num_images=32, seed=0)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_captured_block_calls_replay_to_the_same_outputs(family, calibration):
    """Swin blocks take `input_dimensions` and flags besides the hidden states; replaying the captured call (on any
    subset of images) must reproduce what the block computed inside the model."""
    model, _ = quantize_model(TINY_MODELS[family](), calibration, DFQConfig(bits="w4a4"))
    batches = calibration.batches(12)  # uneven batches: 12 + 12 + 8
    for name, block in get_adapter(model).blocks(model):
        calls = capture_block_calls(model, block, batches)
        outputs = capture_block_outputs(model, block, batches)
        assert calls.num_images == len(calibration) == outputs.shape[0]
        with torch.no_grad():
            torch.testing.assert_close(calls.replay(block), outputs)
            index = torch.tensor([3, 17, 30])
            torch.testing.assert_close(calls.replay(block, index), outputs[index])


def block_errors(model, reference, pixels):
    """Per-block MSE between the quantized model's and the float model's block outputs on `pixels`."""
    errors = []
    pairs = zip(get_adapter(model).blocks(model), get_adapter(reference).blocks(reference))
    for (_, block), (_, float_block) in pairs:
        quantized = capture_block_outputs(model, block, [pixels])
        target = capture_block_outputs(reference, float_block, [pixels])
        errors.append(float((quantized - target).pow(2).mean()))
    return errors


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin])
def test_reconstruction_lowers_held_out_block_error_and_keeps_quantizers_frozen(factory, calibration,
                                                                                cifar_test_pixels):
    config = DFQConfig(bits="w4a4")
    baseline, _ = quantize_model(factory(), calibration, config)
    reference = float_reference(baseline)
    model, _ = quantize_model(factory(), calibration, config)
    before = {name: q.state_dict() for name, q in iter_quantizers(model)}
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}

    options = {"iterations": 40, "lr": 1e-3, "batch_size": 8}
    reports = reconstruct_blocks(model, reference, calibration, config.replace(reconstruction=options))

    assert [r.name for r in reports] == [name for name, _ in get_adapter(model).blocks(model)]
    assert all(r.loss_after < r.loss_before and r.kept for r in reports)
    for name, quantizer in iter_quantizers(model):  # scales and zero points untouched
        for key, value in quantizer.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key}"
    tuned = [n for n, p in model.named_parameters() if n.endswith("weight") and not torch.equal(p, weights[n])]
    assert tuned and all(".layers." in n or ".blocks." in n for n in tuned)  # only the blocks' Linear weights
    assert all(n.endswith(("_proj.weight", "fc1.weight", "fc2.weight")) for n in tuned)

    held_out = cifar_test_pixels[:64]
    with_reconstruction = block_errors(model, reference, held_out)
    without = block_errors(baseline, reference, held_out)
    assert with_reconstruction[-1] < without[-1]
    assert sum(with_reconstruction) < sum(without)


def test_a_block_that_cannot_improve_is_restored(calibration):
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = DFQConfig(bits="w4a4", reconstruction={"iterations": 3, "lr": 10.0, "batch_size": 4})
    reports = reconstruct_blocks(model, reference, calibration, config)
    for report in reports:
        assert not report.kept and report.loss_after == report.loss_before
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def test_a_block_kept_in_float_is_skipped_not_a_crash(calibration):
    """A block with no quantized Linear (kept in float by `modules_to_not_convert`) has nothing to tune: it is
    reported as not kept instead of handing Adam an empty parameter list."""
    config = DFQConfig(bits="w4a4", modules_to_not_convert=[r"re:.*\.layers\.0\..*"],
                       reconstruction={"iterations": 5, "lr": 1e-3, "batch_size": 8})
    model, _ = quantize_model(tiny_vit(), calibration, config.replace(reconstruction={}))
    reports = reconstruct_blocks(model, float_reference(model), calibration, config)
    assert [r.name for r in reports] == ["vit.layers.0", "vit.layers.1"]
    assert not reports[0].kept and reports[0].loss_after == reports[0].loss_before
    assert reports[1].kept


def test_no_reconstruction_options_tune_nothing(calibration):
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert reconstruct_blocks(model, float_reference(model), calibration, DFQConfig(bits="w4a4")) == []
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def test_a_block_with_frozen_weights_is_refused(calibration):
    # frozen weights are integer codes: there is no float weight left for Adam to tune
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    (name, block), *_ = get_adapter(model).blocks(model)
    next(m for m in block.modules() if isinstance(m, QLinear)).freeze()
    config = DFQConfig(bits="w4a4", reconstruction={"iterations": 2, "lr": 1e-3, "batch_size": 4})
    with pytest.raises(DFQError, match=f"Block {name}: its weights are frozen to integer codes; reconstruct before"):
        reconstruct_blocks(model, reference, calibration, config)


def test_pipeline_runs_reconstruction_from_the_config(calibration):
    plain, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    config = DFQConfig(bits="w4a4", reconstruction={"iterations": 5, "lr": 1e-3, "batch_size": 8})
    assert config.reconstruction == {"iterations": 5, "lr": 1e-3, "batch_size": 8}
    tuned, _ = quantize_model(tiny_vit(), calibration, config)
    assert not torch.equal(plain.vit.layers[0].mlp.fc1.weight, tuned.vit.layers[0].mlp.fc1.weight)
    assert torch.equal(plain.classifier.weight, tuned.classifier.weight)  # outside every block


@pytest.mark.parametrize(
    "options, fragment",
    [({"iteration": 10}, "'iteration'"), ({"lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_reconstruction_options_are_named(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        DFQConfig(reconstruction=options)


def test_defaults_are_filled_in():
    assert DFQConfig(reconstruction={"iterations": 100}).reconstruction == {"iterations": 100, "lr": 4e-5,
                                                                            "batch_size": 32}
    assert DFQConfig().reconstruction == {} and DFQConfig().correction == {}


def test_reported_block_loss_is_the_mse_over_every_calibration_image(calibration):
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    (name, block), = get_adapter(model).blocks(model)[:1]
    pixels = [calibration.pixel_values]
    expected = float((capture_block_outputs(model, block, pixels)
                      - capture_block_outputs(reference, reference.get_submodule(name), pixels)).pow(2).mean())
    # batch_size 5 does not divide the 32 images: the last, partial batch must count too
    config = DFQConfig(bits="w4a4", reconstruction={"iterations": 2, "lr": 1e-4, "batch_size": 5})
    reports = reconstruct_blocks(model, reference, calibration, config)
    assert reports[0].name == name and reports[0].loss_before == pytest.approx(expected, rel=1e-5)


def test_learning_rate_decays_along_a_cosine_to_zero(calibration, monkeypatch):
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    rates = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    iterations, lr = 8, 1e-3
    config = DFQConfig(bits="w4a4", reconstruction={"iterations": iterations, "lr": lr, "batch_size": 8})
    reconstruct_blocks(model, reference, calibration, config)
    blocks = len(get_adapter(model).blocks(model))
    expected = [lr * (1 + math.cos(math.pi * t / iterations)) / 2 for t in range(iterations)]
    assert rates == pytest.approx(expected * blocks)


def test_reconstruction_leaves_no_gradient_and_restores_requires_grad(calibration):
    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    (_, block), = get_adapter(model).blocks(model)[:1]
    frozen_norm = next(m for m in block.modules() if isinstance(m, torch.nn.LayerNorm))
    frozen_norm.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = DFQConfig(bits="w4a4", reconstruction={"iterations": 2, "lr": 1e-3, "batch_size": 8})
    reconstruct_blocks(model, reference, calibration, config)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


def test_minibatches_are_distinct_random_images_seeded_by_the_config_and_the_block(calibration, monkeypatch):
    from optimum_dfq.calibration.capture import BlockCalls

    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    drawn = []
    replay = BlockCalls.replay

    def recording_replay(self, block, index=None):
        if torch.is_grad_enabled():  # a training step (the block losses are measured without gradients)
            drawn.append((id(block), index.tolist()))
        return replay(self, block, index)

    monkeypatch.setattr(BlockCalls, "replay", recording_replay)
    orders = []
    for seed in (3, 3, 4):
        drawn.clear()
        config = DFQConfig(bits="w4a4", seed=seed, reconstruction={"iterations": 3, "lr": 1e-6, "batch_size": 8})
        reconstruct_blocks(model, reference, calibration, config)
        blocks = list(dict.fromkeys(block for block, _ in drawn))
        per_block = [[index for block, index in drawn if block == b] for b in blocks]
        assert len(per_block) == 2 and all(len(indices) == 3 for indices in per_block)
        assert all(len(set(index)) == 8 and set(index) <= set(range(len(calibration)))
                   for indices in per_block for index in indices)
        assert per_block[0] != per_block[1]  # each block draws its own order
        assert any(index != list(range(8)) for index in per_block[0])
        orders.append(per_block)
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_each_step_is_an_adam_step_on_the_fresh_mse_gradient(calibration, monkeypatch):
    """Adam without weight decay on the block-output MSE: the gradient each step uses is the MSE gradient at the
    current weights (nothing accumulated), and the first step moves each weight by `lr * g / (|g| + eps)`."""
    import copy

    from optimum_dfq.calibration.reconstruction import reconstruct_block
    from optimum_dfq.nn import QLinear

    model, _ = quantize_model(tiny_vit(), calibration, DFQConfig(bits="w4a4"))
    reference = float_reference(model)
    (name, block), = get_adapter(model).blocks(model)[:1]
    images = calibration.batches(16)
    calls = capture_block_calls(model, block, images)
    targets = capture_block_outputs(reference, reference.get_submodule(name), images)
    untouched = copy.deepcopy(block)
    steps = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        params = self.param_groups[0]["params"]
        before = [(p.detach().clone(), p.grad.detach().clone()) for p in params]
        result = step(self, *args, **kwargs)
        steps.append((before, [p.detach().clone() for p in params]))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    lr = 1e-3
    reconstruct_block(block, calls, targets, iterations=2, lr=lr, batch_size=len(calibration), name=name)

    weights = [m.weight for m in untouched.modules() if isinstance(m, QLinear)]
    assert len(steps) == 2 and len(steps[0][0]) == len(weights)
    for before, _ in steps:
        with torch.no_grad():
            for weight, (value, _) in zip(weights, before):
                weight.copy_(value)
        loss = torch.nn.functional.mse_loss(calls.replay(untouched), targets)
        gradients = torch.autograd.grad(loss, weights)
        for gradient, (_, used) in zip(gradients, before):
            torch.testing.assert_close(used, gradient, rtol=1e-4, atol=1e-9)
    (first_before, first_after) = steps[0]
    for (value, gradient), after in zip(first_before, first_after):
        torch.testing.assert_close(after, value - lr * gradient / (gradient.abs() + 1e-8), rtol=0, atol=1e-7)
