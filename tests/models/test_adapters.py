import pytest
import torch
from transformers import BeitConfig, BeitForImageClassification

from optimum_dfq import UnsupportedArchitectureError
from optimum_dfq.models import find_activation_consumers, find_layernorm_consumers, get_adapter


def test_unsupported_architecture_names_the_supported_ones():
    model = BeitForImageClassification(BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_adapter(model)
    message = str(err.value)
    assert "BeitForImageClassification" in message
    for name in ("ViTForImageClassification", "DeiTForImageClassification",
                 "DeiTForImageClassificationWithTeacher", "SwinForImageClassification"):
        assert name in message


def test_model_name_and_compiled_model_are_refused_with_the_fix():
    from ..conftest import tiny_vit

    with pytest.raises(UnsupportedArchitectureError, match=r"DataFreeViTQuantizer\.from_pretrained\('org/vit'\)"):
        get_adapter("org/vit")
    with pytest.raises(UnsupportedArchitectureError, match=r"torch\.compile.*model\._orig_mod"):
        get_adapter(torch.compile(tiny_vit()))


def test_structure_is_found_by_type(tiny_model):
    adapter = get_adapter(tiny_model)
    blocks, attention = adapter.blocks(tiny_model), adapter.attention_modules(tiny_model)
    assert len(blocks) == len(attention) == (4 if adapter.family == "swin" else 2)
    assert len(adapter.patch_embeddings(tiny_model)) == 1
    num_classifiers = 2 if type(tiny_model).__name__.endswith("WithTeacher") else 1
    # per block: q, k, v, o, fc1, fc2 (+ one Swin reduction between stages) + classifiers
    expected = 6 * len(blocks) + num_classifiers + (1 if adapter.family == "swin" else 0)
    assert len(adapter.linears(tiny_model)) == expected


def test_layernorm_consumers_follow_dataflow(tiny_model):
    adapter = get_adapter(tiny_model)
    consumers = find_layernorm_consumers(tiny_model, torch.randn(1, 3, 32, 32))
    groups = sorted(len(v) for v in consumers.values())
    num_blocks = len(adapter.blocks(tiny_model))
    # q/k/v share the pre-attention LayerNorm; fc1 reads the pre-MLP LayerNorm; Swin's merging norm -> reduction
    expected = [1] * num_blocks + [3] * num_blocks
    if adapter.family == "swin":
        expected = [1] * (num_blocks + 1) + [3] * num_blocks
    assert groups == sorted(expected)
    linears = dict(adapter.linears(tiny_model))
    for names in consumers.values():
        assert all(name in linears for name in names)
    attention_linears = {id(m) for _, att in adapter.attention_modules(tiny_model)
                         for m in att.modules() if isinstance(m, torch.nn.Linear)}
    for names in consumers.values():
        if len(names) == 3:
            assert all(id(linears[n]) in attention_linears for n in names)
    # the classifier reads a slice / pooled LayerNorm output: not a per-channel fold target
    for names in consumers.values():
        assert not any("classifier" in n for n in names)


def test_activation_consumers_are_the_mlp_output_linears(tiny_model):
    adapter = get_adapter(tiny_model)
    pixels = torch.randn(1, 3, 32, 32)
    post_gelu = find_activation_consumers(tiny_model, pixels)
    assert len(post_gelu) == len(adapter.blocks(tiny_model))  # one MLP per block
    linears = dict(adapter.linears(tiny_model))
    post_layernorm = {name for names in find_layernorm_consumers(tiny_model, pixels).values() for name in names}
    attention_linears = {id(m) for _, att in adapter.attention_modules(tiny_model)
                         for m in att.modules() if isinstance(m, torch.nn.Linear)}
    for name in post_gelu:
        linear = linears[name]
        assert name not in post_layernorm and id(linear) not in attention_linears
        assert linear.in_features > linear.out_features  # the MLP's down projection (mlp_ratio > 1)
