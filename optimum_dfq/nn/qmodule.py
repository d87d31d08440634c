"""The quantized-module mixin and the float-class → quantized-class registry."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..errors import ConfigError
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


def quantized_class_for(module: nn.Module, name: str) -> type[nn.Module]:
    """The registered quantized class for `module` (at path `name`); a clear error when there is none.

    The lookup is by exact type: a subclass of `nn.Linear` may change what the layer computes, so it is not
    quantized as if it were a plain `nn.Linear`.
    """
    qclass = qmodule_class_for(module)
    if qclass is None:
        kind = type(module)
        registered = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in _QMODULE_TABLE))
        raise ConfigError(
            f"{name} is a {kind.__module__}.{kind.__qualname__}, which has no registered quantized class "
            f"(registered: {registered}). Keep it in float with DFQConfig(modules_to_not_convert=[{name!r}]) or "
            f"register a quantized twin with @register_qmodule({kind.__qualname__})."
        )
    return qclass


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
