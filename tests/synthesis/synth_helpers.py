"""Tiny random models and shared settings for the synthesis tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

# Deliberately not ImageNet's statistics: the valid range must come from what the caller passes.
MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
NORM = {"image_mean": MEAN, "image_std": STD}
#: Engine settings small enough for tests: 2 phases of 2 steps.
FAST = {"iterations": (2, 2), "warmup": 1, "jitter": (2, 4), "log_every": 1}
SYNTHESIZERS = ("psaq", "sardfq", "dfq-vit")


def tiny_vit(initializer_range: float = 0.02) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, initializer_range=initializer_range)
    return ViTForImageClassification(config).eval()


def tiny_deit(initializer_range: float = 0.02) -> DeiTForImageClassificationWithTeacher:
    torch.manual_seed(0)
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=10, initializer_range=initializer_range)
    return DeiTForImageClassificationWithTeacher(config).eval()


def tiny_deit_plain(initializer_range: float = 0.02) -> DeiTForImageClassification:
    torch.manual_seed(0)
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=10, initializer_range=initializer_range)
    return DeiTForImageClassification(config).eval()


def tiny_swin(initializer_range: float = 0.02) -> SwinForImageClassification:
    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
                        num_labels=10, initializer_range=initializer_range)
    return SwinForImageClassification(config).eval()


BUILDERS = {"vit": tiny_vit, "deit": tiny_deit, "deit_plain": tiny_deit_plain, "swin": tiny_swin}


@pytest.fixture
def one_thread():
    """Runs the test on one intra-op thread (deterministic reductions; no OpenMP contention on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def bounds() -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    return -mean / std, (1 - mean) / std


def plan_batch(synthesizer, model, indices):
    """`synthesizer.plan_batch` for a 32-pixel, 10-class `model` on CPU (the terms and labels of one batch)."""
    from optimum_dfq.models import get_adapter
    from optimum_dfq.synthesis.features import probe_attention_sites
    from optimum_dfq.synthesis.pixel_synthesizer import ModelInfo

    adapter = get_adapter(model)
    info = ModelInfo(model, adapter, probe_attention_sites(model, adapter), (3, 32, 32), 10, torch.device("cpu"))
    return synthesizer.plan_batch(info, indices, seed=0)
