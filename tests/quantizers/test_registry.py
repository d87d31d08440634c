"""The quantizer-kind registry: building quantizers by kind name, and refusing a taken kind."""

from __future__ import annotations

import pytest

from optimum_dfq.errors import ConfigError
from optimum_dfq.quantizers import QUANTIZER_REGISTRY, UniformQuantizer, build_quantizer, register_quantizer_kind


def test_built_in_kinds_build_their_classes():
    assert type(build_quantizer("uniform", bits=4)) is UniformQuantizer
    with pytest.raises(ConfigError, match=r"Unknown quantizer kind 'nope'; registered: \[.*'uniform'"):
        build_quantizer("nope", bits=4)


def test_a_taken_kind_is_refused_until_removed():
    class Shadow(UniformQuantizer):
        kind = "uniform"

    with pytest.raises(ConfigError, match=r"'uniform' is already registered to .*UniformQuantizer.*del QUANTIZER_"):
        register_quantizer_kind(Shadow)
    assert QUANTIZER_REGISTRY["uniform"] is UniformQuantizer
    assert register_quantizer_kind(UniformQuantizer) is UniformQuantizer  # the same class again: allowed

    class Fresh(UniformQuantizer):
        kind = "test_fresh"

    try:
        assert register_quantizer_kind(Fresh) is Fresh
        assert type(build_quantizer("test_fresh", bits=4)) is Fresh
    finally:
        del QUANTIZER_REGISTRY["test_fresh"]
