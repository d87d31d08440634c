"""Token positions of every attention module, and attention priors that move with the rolled/flipped image."""

from __future__ import annotations

import pytest
import torch
from synth_helpers import FAST, NORM, one_thread, plan_batch, tiny_deit, tiny_swin, tiny_vit  # noqa: F401
from transformers import SwinConfig, SwinForImageClassification, ViTConfig, ViTForImageClassification

from optimum_dfq.errors import SynthesisError
from optimum_dfq.models import get_adapter
from optimum_dfq.synthesis import AttentionPriorTerm, LossTerm, get_synthesizer, stream_generator
from optimum_dfq.synthesis.augment import JitterFlip
from optimum_dfq.synthesis.context import StepContext
from optimum_dfq.synthesis.features import FeatureCapture, probe_attention_sites
from optimum_dfq.synthesis.geometry import probe_token_grids, roll_and_flip_maps
from optimum_dfq.synthesis.losses import aligned_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _grids(model):
    adapter = get_adapter(model)
    sites = probe_attention_sites(model, adapter)
    return sites, probe_token_grids(model, adapter, sites)


@pytest.mark.parametrize("builder", [tiny_vit, tiny_deit])
def test_global_attention_tokens_are_the_patch_grid(builder):
    sites, grids = _grids(builder())
    for site in sites:
        grid = grids[site.index]
        assert (grid.rows, grid.cols, grid.pixels) == (4, 4, (8, 8))
        assert torch.equal(grid.positions, torch.arange(16).view(1, 16))  # prefix tokens excluded


def _swin_window_oracle(side: int, window: int, shift: int, padded: int | None = None) -> torch.Tensor:
    """Raster index of each (window, token) slot (-1: padding), per Swin's padding to a multiple of the window, cyclic
    shift, then row-major window partition."""
    padded = padded or side
    raster = torch.full((padded, padded), -1)
    raster[:side, :side] = torch.arange(side * side).view(side, side)
    raster = torch.roll(raster, shifts=(-shift, -shift), dims=(0, 1))
    tiles = raster.view(padded // window, window, padded // window, window).permute(0, 2, 1, 3)
    return tiles.reshape(-1, window * window)


def test_swin_tokens_follow_windows_and_cyclic_shift():
    sites, grids = _grids(tiny_swin())  # stage 1: 8x8 tokens, windows of 4, second block shifted by 2; stage 2: 4x4
    expected = [(8, 4, 0, 4), (8, 4, 2, 4), (4, 4, 0, 8), (4, 4, 0, 8)]
    for site, (side, window, shift, pixels) in zip(sites, expected, strict=True):
        grid = grids[site.index]
        assert (grid.rows, grid.cols, grid.pixels) == (side, side, (pixels, pixels))
        assert torch.equal(grid.positions, _swin_window_oracle(side, window, shift))


def _padded_swin():
    # 40-pixel images, patch 4: a 10x10 grid padded to 12x12 for windows of 4, then 5x5 padded to 8x8.
    torch.manual_seed(0)
    return SwinForImageClassification(SwinConfig(image_size=40, patch_size=4, embed_dim=16, depths=[2, 2],
                                                 num_heads=[2, 2], window_size=4, num_labels=10)).eval()


def test_padded_windows_mark_their_padding():
    sites, grids = _grids(_padded_swin())
    expected = [(10, 12, 0, 4), (10, 12, 2, 4), (5, 8, 0, 8), (5, 8, 2, 8)]  # (side, padded side, shift, pixels)
    for site, (side, padded, shift, pixels) in zip(sites, expected, strict=True):
        grid = grids[site.index]
        assert (grid.rows, grid.cols, grid.pixels) == (side, side, (pixels, pixels))
        assert torch.equal(grid.positions, _swin_window_oracle(side, 4, shift, padded))
    calib = get_synthesizer("sardfq", **FAST).synthesize(_padded_swin(), 2, seed=0, **NORM)  # runs with padding
    assert calib.pixel_values.shape == (2, 3, 40, 40) and bool(torch.isfinite(calib.pixel_values).all())


def test_non_square_patches_give_non_square_tokens():
    # patch_size as a (height, width) pair: 4x8 tokens of 8x4 pixels (ViT); Swin's merging keeps the patch's shape
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=(8, 4), hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    swin = SwinForImageClassification(SwinConfig(image_size=32, patch_size=(4, 2), embed_dim=16, depths=[2, 2],
                                                 num_heads=[2, 2], window_size=4, num_labels=10)).eval()
    for model, expected in ((vit, [(4, 8, (8, 4))] * 2), (swin, [(8, 16, (4, 2))] * 2 + [(4, 8, (8, 4))] * 2)):
        sites, grids = _grids(model)
        assert [(grids[s.index].rows, grids[s.index].cols, grids[s.index].pixels) for s in sites] == expected
        calib = get_synthesizer("sardfq", **FAST).synthesize(model, 2, seed=0, **NORM)
        assert bool(torch.isfinite(calib.pixel_values).all())
    assert torch.equal(grids[sites[0].index].positions.flatten().sort().values, torch.arange(128))


def test_half_precision_models_are_probed_exactly():
    # 16x16 tokens at stage 1: raster indices up to 255 and, in fp16/bf16, none above 256 would survive as one float
    model = SwinForImageClassification(SwinConfig(image_size=64, patch_size=2, embed_dim=16, depths=[2],
                                                  num_heads=[2], window_size=8, num_labels=10)).eval()
    sites, expected = _grids(model)
    halved = probe_token_grids(model.to(torch.bfloat16), get_adapter(model), sites)
    for index, grid in expected.items():
        assert grid.positions.max() == 1023 and torch.equal(halved[index].positions, grid.positions)


def test_a_grid_that_does_not_tile_the_image_is_refused_with_the_fix():
    from types import SimpleNamespace

    from optimum_dfq.synthesis.geometry import _grid

    site = SimpleNamespace(index=3, windows=1)
    repeated = {3: torch.tensor([[0, 1, 2, 2]])}
    with pytest.raises(SynthesisError, match=r"#3 .*repeated or missing.*apa_follow_augmentation=False"):
        _grid(site, repeated, 0, (32, 32), (8, 8))
    with pytest.raises(SynthesisError, match="no grid that divides the 31x31 image"):
        _grid(site, {3: torch.arange(4).view(1, 4)}, 0, (31, 31), (8, 8))


def test_the_refusal_counts_the_tokens_repeated_or_missing_and_names_a_module_never_called():
    from types import SimpleNamespace

    from optimum_dfq.synthesis.geometry import _grid

    site = SimpleNamespace(index=3, windows=1)
    with pytest.raises(SynthesisError, match=r"\(2 token position\(s\) repeated or missing among 6\)"):
        _grid(site, {3: torch.tensor([[0, 1, 2, 2, 4, 4]])}, 0, (32, 32), (8, 8))
    with pytest.raises(SynthesisError, match=r"Attention module #3 was not called during the token-position probe"):
        _grid(site, {}, 0, (32, 32), (8, 8))


@pytest.mark.parametrize(("count", "image"), [(5, (32, 32)), (4, (32, 48))], ids=["five-tokens", "aspect-ratio"])
def test_tokens_that_cannot_be_patches_of_the_image_are_refused(count, image):
    # 5 tokens fill no rows x cols grid; 4 square-patch tokens cannot tile a 32x48 image (2 x 3 would need 6)
    from types import SimpleNamespace

    from optimum_dfq.synthesis.geometry import _grid

    site = SimpleNamespace(index=3, windows=1)
    with pytest.raises(SynthesisError, match=f"its {count} tokens form no grid that divides the"):
        _grid(site, {3: torch.arange(count).view(1, count)}, 0, image, (8, 8))


def test_a_non_square_image_gives_tokens_of_its_own_height_and_width():
    from types import SimpleNamespace

    from optimum_dfq.synthesis.geometry import _grid

    grid = _grid(SimpleNamespace(index=3, windows=1), {3: torch.arange(24).view(1, 24)}, 0, (32, 48), (8, 8))
    assert (grid.rows, grid.cols, grid.pixels) == (4, 6, (8, 8))  # a 32x48 image in 8x8 patches


def test_tokens_that_are_not_patch_shaped_are_refused():
    # 36-pixel images in 8-pixel patches: the patch embedding drops the last 4 pixels, so the 4x4 tokens cover 32x32
    # pixels and a roll of the 36-pixel image does not move them token by token (they were taken as 9x9 tokens)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=36, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    with pytest.raises(SynthesisError, match=r"4x4 tokens would be 9x9 pixels, not the 8x8 patch scaled by one whole "
                                             r"factor.*apa_follow_augmentation=False"):
        _grids(model)
    from types import SimpleNamespace

    from optimum_dfq.synthesis.geometry import _grid

    with pytest.raises(SynthesisError, match=r"2x4 tokens would be 16x8 pixels"):  # 8 square patches on a square
        _grid(SimpleNamespace(index=3, windows=1), {3: torch.arange(8).view(1, 8)}, 0, (32, 32), (8, 8))


def test_whole_token_moves_are_rolls_then_flips():
    maps = torch.rand(3, 2, 4, 5)
    offsets, flips = torch.tensor([8, -4, 0]), torch.tensor([True, False, False])
    moved = roll_and_flip_maps(maps, offsets, flips, pixels=(4, 4))
    assert torch.allclose(moved[0], torch.roll(maps[0], (2, 2), dims=(1, 2)).flip(-1))
    assert torch.allclose(moved[1], torch.roll(maps[1], (-1, -1), dims=(1, 2)))
    assert torch.equal(moved[2], maps[2])


def test_without_flips_maps_are_only_rolled():
    maps = torch.rand(2, 1, 4, 5)
    moved = roll_and_flip_maps(maps, torch.tensor([8, -4]), None, pixels=(4, 4))  # None: no image is flipped
    assert torch.allclose(moved[0], torch.roll(maps[0], (2, 2), dims=(1, 2)))
    assert torch.allclose(moved[1], torch.roll(maps[1], (-1, -1), dims=(1, 2)))


def test_non_square_tokens_move_by_their_own_height_and_width():
    maps = torch.rand(2, 1, 4, 6)
    offsets, flips = torch.tensor([8, -4]), torch.tensor([False, True])
    moved = roll_and_flip_maps(maps, offsets, flips, pixels=(4, 2))  # tokens 4 pixels high, 2 wide
    assert torch.allclose(moved[0], torch.roll(maps[0], (2, 4), dims=(1, 2)))
    assert torch.allclose(moved[1], torch.roll(maps[1], (-1, -2), dims=(1, 2)).flip(-1))


def test_fractional_moves_interpolate_and_keep_the_mass():
    maps = torch.rand(1, 1, 4, 4)
    moved = roll_and_flip_maps(maps, torch.tensor([1]), torch.tensor([False]), pixels=(4, 4))  # a quarter token
    rows = 0.75 * maps + 0.25 * torch.roll(maps, 1, dims=2)
    assert torch.allclose(moved, 0.75 * rows + 0.25 * torch.roll(rows, 1, dims=3))
    assert torch.allclose(moved.sum(), maps.sum())


def _translation_equivariant_vit():
    """A tiny ViT whose CLS attention moves exactly with its image under whole-patch rolls and flips."""
    model = tiny_vit(initializer_range=0.2)
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.zero_()  # no absolute position: patches are a set
        conv = get_adapter(model).patch_embeddings(model)[0][1]
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)  # a flipped patch embeds like the patch
    return model


def _aligned(model, sites, pixels):
    with torch.no_grad(), FeatureCapture(model, sites, {"attention_probs"}) as capture:
        logits = model(pixel_values=pixels).logits
        maps = {site.index: aligned_attention(capture.attention_probs(site.index), pixels.shape[0], 1, 1)
                for site in sites}
        return maps, capture, logits


@pytest.mark.parametrize("follow", [True, False])
def test_prior_in_the_image_frame_matches_the_augmented_attention(follow):
    model = _translation_equivariant_vit()
    sites, grids = _grids(model)
    images = torch.randn(3, 3, 32, 32)
    priors, _, _ = _aligned(model, sites, images)  # the un-augmented images' own attention, as priors
    term = AttentionPriorTerm(priors, {site.index: 1.0 for site in sites}, grids=grids if follow else None)
    offsets, flips = torch.tensor([8, -16, 0]), torch.tensor([True, False, True])  # whole patches (patch 8)
    augmented = JitterFlip.apply(images, offsets, flips)
    with torch.no_grad(), FeatureCapture(model, sites, {"attention_probs"}) as capture:
        logits = model(pixel_values=augmented).logits
        ctx = StepContext(0, 0, 0, 1, 1, augmented, augmented, logits, torch.arange(3), capture, sites, 1,
                          offsets, flips)
        loss = term(ctx)
    if follow:
        assert float(loss.max()) < 1e-10
    else:
        assert float(loss.min()) > 1e-6  # a fixed prior disagrees with the moved attention


class _RecordAugmentation(LossTerm):
    name = "record"

    def __init__(self) -> None:
        super().__init__(0.0)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def weight_at(self, ctx):
        self.seen.append((ctx.offsets.clone(), ctx.flips.clone()))
        return 0.0

    def __call__(self, ctx):  # never called: weight 0
        raise AssertionError


def test_engine_tells_the_terms_each_steps_augmentation():
    from optimum_dfq.synthesis import BatchPlan, CrossEntropyTerm, EngineConfig, optimize_batch

    model = tiny_vit().requires_grad_(False)
    recorder = _RecordAugmentation()
    plan = BatchPlan([5, 9], torch.randn(2, 3, 32, 32), [CrossEntropyTerm(torch.tensor([1, 2])), recorder])
    config = EngineConfig(iterations=(3, 3), warmup=1, jitter=(2, 6))
    optimize_batch(model, plan, config, bounds=(-torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1)), sites=[],
                   num_prefix_tokens=1, seed=4)
    reference = JitterFlip([stream_generator(4, i, "augment") for i in (5, 9)], config.flip_prob)
    expected = [reference.draw(jitter) for jitter in (2, 2, 2, 6, 6, 6)]
    assert len(recorder.seen) == 6
    for (offsets, flips), (want_offsets, want_flips) in zip(recorder.seen, expected, strict=True):
        assert torch.equal(offsets, want_offsets) and torch.equal(flips, want_flips)


@pytest.mark.parametrize("builder", [tiny_vit, tiny_swin])
def test_sardfq_priors_follow_the_image_unless_told_not_to(builder):
    model = builder()
    following = plan_batch(get_synthesizer("sardfq", **FAST), model, [0, 1]).terms[0]
    fixed = plan_batch(get_synthesizer("sardfq", apa_follow_augmentation=False, **FAST), model, [0, 1]).terms[0]
    assert following.grids is not None and fixed.grids is None
    assert sorted(following.grids) == sorted(following.priors)
    for index, prior in following.priors.items():
        assert torch.equal(prior, fixed.priors[index])  # same draws; only the frame differs
    ctx = StepContext(0, 0, 0, 1, 1, torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), torch.zeros(2, 10),
                      torch.arange(2), None, [], 0, torch.tensor([0, 0]), torch.tensor([False, False]))
    for index, prior in following.priors.items():
        assert torch.allclose(following.prior_at(index, ctx), prior, atol=1e-7)  # no move: the drawn prior


@pytest.mark.parametrize("builder", [tiny_swin, _padded_swin])
def test_windowed_priors_move_across_windows_and_stay_normalised(builder):
    model = builder()
    sites, grids = _grids(model)
    site = sites[1]  # the shifted-window block
    grid = grids[site.index]
    priors = {site.index: torch.rand(2, site.windows, site.heads, site.tokens)}
    priors[site.index] /= priors[site.index].sum(-1, keepdim=True)
    term = AttentionPriorTerm(priors, {site.index: 1.0}, grids={site.index: grid})
    offsets, flips = torch.tensor([2 * grid.pixels[0], -grid.pixels[0]]), torch.tensor([True, False])
    side = grid.rows
    positions = grid.positions
    # by hand: scatter each window's map over the image grid, roll whole tokens, flip, cut back, renormalise
    expected = torch.zeros(2, site.heads, side * side)
    real = positions >= 0
    expected[:, :, positions[real]] = priors[site.index].permute(0, 2, 1, 3)[:, :, real]
    expected = expected.view(2, site.heads, side, side)
    expected = torch.stack([torch.roll(expected[0], (2, 2), dims=(1, 2)).flip(-1),
                            torch.roll(expected[1], (-1, -1), dims=(1, 2))])
    expected = expected.flatten(-2)[..., positions.clamp_min(0)] * real
    expected = expected.permute(0, 2, 1, 3)
    expected = expected / expected.sum(-1, keepdim=True)
    ctx = StepContext(0, 0, 0, 1, 1, torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1), torch.zeros(2, 10),
                      torch.arange(2), None, [], 0, offsets, flips)
    moved = term.prior_at(site.index, ctx)
    assert torch.allclose(moved, expected, atol=1e-6)
    assert not torch.allclose(moved, priors[site.index])  # it did move across windows
    fractional = term.prior_at(site.index, StepContext(0, 0, 0, 1, 1, torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1),
                                                       torch.zeros(2, 10), torch.arange(2), None, [], 0,
                                                       torch.tensor([1, 3]), None))
    assert torch.allclose(fractional.sum(-1), torch.ones(2, site.windows, site.heads))
    assert bool((fractional.permute(0, 2, 1, 3)[:, :, ~real] == 0).all())  # padding slots get no mass


def test_priors_without_a_grid_are_refused():
    _, grids = _grids(tiny_vit())
    with pytest.raises(SynthesisError, match=r"modules \[7\] have no token grid"):
        AttentionPriorTerm({7: torch.rand(1, 1, 2, 16)}, {7: 1.0}, grids=grids)


def test_follow_setting_is_part_of_the_cache_key():
    on = get_synthesizer("sardfq").hyperparameters()
    off = get_synthesizer("sardfq", apa_follow_augmentation=False).hyperparameters()
    assert on != off and on["apa_follow_augmentation"] is True
