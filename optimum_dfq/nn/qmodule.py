"""The quantized-module mixin and the float-class → quantized-class registry."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..quantizers import Quantizer

_QMODULE_TABLE: dict[type[nn.Module], type[nn.Module]] = {}


def register_qmodule(float_cls: type[nn.Module]):
    """Class decorator: `@register_qmodule(nn.Linear)` makes the decorated class the quantized twin of `nn.Linear`."""

    def wrapper(cls: type[nn.Module]) -> type[nn.Module]:
        _QMODULE_TABLE[float_cls] = cls
        return cls

    return wrapper


def qmodule_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The registered quantized class for `module`'s exact type, or `None`."""
    return _QMODULE_TABLE.get(type(module))


class QModuleMixin:
    """Behaviour shared by every quantized module: enumerating and switching its quantizers."""

    def named_quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for name, child in self.named_children():  # type: ignore[attr-defined]
            if isinstance(child, Quantizer):
                yield name, child

    def weight_quantizers(self) -> Iterator[Quantizer]:
        for name, quantizer in self.named_quantizers():
            if name == "weight_quantizer":
                yield quantizer

    def activation_quantizers(self) -> Iterator[Quantizer]:
        for name, quantizer in self.named_quantizers():
            if name != "weight_quantizer":
                yield quantizer

    def calibrate_weights(self) -> None:
        """(Re-)calibrates the weight quantizer from the current float weight."""
        quantizer = getattr(self, "weight_quantizer", None)
        if quantizer is None:
            return
        mode = quantizer.mode
        quantizer.reset()
        quantizer.observe(self.weight)  # type: ignore[attr-defined]
        quantizer.calibrate()
        quantizer.set_mode("off" if mode == "off" else "quantize")
