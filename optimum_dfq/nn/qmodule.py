"""The quantized-module mixin and the float-class → quantized-class registry."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..errors import ConfigError
from ..quantizers import Quantizer
from ..registry import qualified_name, register_unique

_QMODULE_TABLE: dict[type[nn.Module], type[nn.Module]] = {}


def register_qmodule(float_cls: type[nn.Module]):
    """Returns a class decorator that makes the decorated class the quantized twin of `float_cls`.

    Conversion looks the twin up for each patch-embedding and linear layer of the model (by exact type) and builds
    the replacement with `twin.from_float(module, weight_quantizer, input_quantizer, site)`, the class method of
    [`QLinear`] and [`QConv2d`]. A float class that already has another twin is refused: unregister it first with
    [`unregister_qmodule`]. A twin with the same module and qualified name (a module reloaded, a notebook cell re-run)
    replaces itself.

    Args:
        float_cls (`type[nn.Module]`): the float layer class, e.g. `nn.Linear`.

    Returns:
        `Callable[[type[nn.Module]], type[nn.Module]]`: the decorator; it records the mapping and returns the
        decorated class unchanged.

    Raises:
        `ConfigError`: (from the decorator) when `float_cls` already has a different quantized twin.

    Example:

    ```python
    >>> from torch import nn
    >>> from optimum_dfq.nn import QLinear, qmodule_class_for, register_qmodule, unregister_qmodule
    >>> class MyLinear(nn.Linear):  # not quantized as an nn.Linear: lookups are by exact type
    ...     pass
    >>> register_qmodule(MyLinear)(QLinear) is QLinear  # same as `@register_qmodule(MyLinear)` on a class
    True
    >>> qmodule_class_for(MyLinear(2, 2)).__name__
    'QLinear'
    >>> unregister_qmodule(MyLinear)
    ```
    """

    def wrapper(cls: type[nn.Module]) -> type[nn.Module]:
        register_unique(_QMODULE_TABLE, float_cls, cls, lambda existing: ConfigError(
            f"{qualified_name(float_cls)} already has the quantized class {qualified_name(existing)}; call "
            f"unregister_qmodule({float_cls.__qualname__}) first to replace it."
        ))
        return cls

    return wrapper


def unregister_qmodule(float_cls: type[nn.Module]) -> None:
    """Removes the quantized twin registered for `float_cls` (a no-op when there is none).

    Args:
        float_cls (`type[nn.Module]`): the float layer class given to [`register_qmodule`].
    """
    _QMODULE_TABLE.pop(float_cls, None)


def qmodule_class_for(module: nn.Module) -> type[nn.Module] | None:
    """Looks up the registered quantized class for the exact type of `module`.

    Subclasses do not inherit their parent's twin: a subclass of `nn.Linear` gets `None` unless it was registered
    itself with [`register_qmodule`].

    Args:
        module (`nn.Module`): a float layer.

    Returns:
        `type[nn.Module]` or `None`: the quantized class, or `None` when none is registered for that type.

    Example:

    ```python
    >>> from torch import nn
    >>> from optimum_dfq.nn import qmodule_class_for
    >>> qmodule_class_for(nn.Linear(2, 2)).__name__
    'QLinear'
    >>> qmodule_class_for(nn.Conv2d(3, 8, 2)).__name__
    'QConv2d'
    >>> qmodule_class_for(nn.LayerNorm(2)) is None  # QLayerNorm is applied by the quantization plan instead
    True
    ```
    """
    return _QMODULE_TABLE.get(type(module))


def quantized_class_for(module: nn.Module, name: str) -> type[nn.Module]:
    """Looks up the registered quantized class for `module`, raising an error that explains the fix when there is none.

    The lookup is by exact type, as in [`qmodule_class_for`]: a subclass of `nn.Linear` may change what the layer
    computes, so it is not quantized as if it were a plain `nn.Linear`.

    Args:
        module (`nn.Module`): a float layer.
        name (`str`): its path in the model, used in the error message.

    Returns:
        `type[nn.Module]`: the quantized class.

    Raises:
        `ConfigError`: when no quantized class is registered for `type(module)`; the message lists the registered
            types and suggests `DFQConfig(modules_to_not_convert=[name])` or [`register_qmodule`].

    Example:

    ```python
    >>> from torch import nn
    >>> from optimum_dfq.nn import quantized_class_for
    >>> quantized_class_for(nn.Linear(2, 2), "classifier").__name__
    'QLinear'
    >>> quantized_class_for(nn.GELU(), "mlp.act")
    Traceback (most recent call last):
        ...
    optimum_dfq.errors.ConfigError: mlp.act is of type torch.nn.modules.activation.GELU, which has no registered ...
    ```
    """
    qclass = qmodule_class_for(module)
    if qclass is None:
        kind = type(module)
        registered = ", ".join(sorted(qualified_name(t) for t in _QMODULE_TABLE))
        raise ConfigError(
            f"{name} is of type {qualified_name(kind)}, which has no registered quantized class "
            f"(registered: {registered}). Keep it in float with DFQConfig(modules_to_not_convert=[{name!r}]) or "
            f"register a quantized twin with @register_qmodule({kind.__qualname__})."
        )
    return qclass


class QModuleMixin:
    """Behaviour shared by every quantized module: finding its quantizers and calibrating its weight quantizer.

    A quantized module keeps its quantizers as direct child modules. The one named `weight_quantizer` (if any)
    quantizes the weight; every other one (`input_quantizer`, `output_quantizer`) quantizes activations.

    Example:

    ```python
    >>> from torch import nn
    >>> from optimum_dfq.nn import QLinear, QModuleMixin
    >>> from optimum_dfq.quantizers import UniformQuantizer
    >>> layer = QLinear.from_float(nn.Linear(8, 4), UniformQuantizer(bits=4, channels=4, axis=0),
    ...                            UniformQuantizer(bits=8), site="fc")
    >>> isinstance(layer, QModuleMixin), [name for name, _ in layer.named_quantizers()]
    (True, ['weight_quantizer', 'input_quantizer'])
    >>> layer.calibrate_weights(); bool(layer.weight_quantizer.calibrated), bool(layer.input_quantizer.calibrated)
    (True, False)
    ```
    """

    def named_quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        """Yields `(attribute name, quantizer)` for each direct child that is a [`Quantizer`], in registration order."""
        for name, child in self.named_children():  # type: ignore[attr-defined]
            if isinstance(child, Quantizer):
                yield name, child

    def weight_quantizers(self) -> Iterator[Quantizer]:
        """Yields the child named `weight_quantizer`, if there is one."""
        for name, quantizer in self.named_quantizers():
            if name == "weight_quantizer":
                yield quantizer

    def activation_quantizers(self) -> Iterator[Quantizer]:
        """Yields every child quantizer except `weight_quantizer`."""
        for name, quantizer in self.named_quantizers():
            if name != "weight_quantizer":
                yield quantizer

    def calibrate_weights(self) -> None:
        """(Re-)calibrates the weight quantizer from the current float weight.

        The quantizer is reset, observes `self.weight` and calibrates; it then ends in `"quantize"` mode, or stays
        `"off"` if it was off. Does nothing when the module has no `weight_quantizer`.
        """
        quantizer = getattr(self, "weight_quantizer", None)
        if quantizer is None:
            return
        mode = quantizer.mode
        quantizer.reset()
        quantizer.observe(self.weight)  # type: ignore[attr-defined]
        quantizer.calibrate()
        quantizer.set_mode("off" if mode == "off" else "quantize")
