"""The synthesizer registry."""

from __future__ import annotations

import pytest

from optimum_dfq.errors import SynthesisError
from optimum_dfq.synthesis import SYNTHESIZERS, GaussianSynthesizer, get_synthesizer, register_synthesizer


@pytest.fixture
def scratch_name():
    yield "test-scratch"
    SYNTHESIZERS.pop("test-scratch", None)


def test_registered_class_is_built_by_name(scratch_name):
    @register_synthesizer(scratch_name)
    class Wide(GaussianSynthesizer):
        pass

    synth = get_synthesizer(scratch_name, std=2.0)
    assert type(synth) is Wide and synth.name == scratch_name and synth.std == 2.0


def test_a_taken_name_is_not_silently_rebound(scratch_name):
    @register_synthesizer(scratch_name)
    class First(GaussianSynthesizer):
        pass

    with pytest.raises(SynthesisError, match=r"'test-scratch' is already registered to .*First.*del "):
        @register_synthesizer(scratch_name)
        class Second(GaussianSynthesizer):
            pass

    assert SYNTHESIZERS[scratch_name] is First
    with pytest.raises(SynthesisError, match="already registered"):
        register_synthesizer("gaussian")(type("Other", (GaussianSynthesizer,), {}))
    assert SYNTHESIZERS["gaussian"] is GaussianSynthesizer
