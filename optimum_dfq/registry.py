"""Name → class (or function) registries that never silently replace another entry."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any


def qualified_name(obj: Any) -> str:
    """`module.QualifiedName` of a class or function."""
    return f"{obj.__module__}.{obj.__qualname__}"


def is_same_definition(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are one definition, possibly imported again (a reloaded module, a re-run notebook cell)."""
    return a is b or qualified_name(a) == qualified_name(b)


def register_unique(
    registry: MutableMapping[Any, Any], key: Any, value: Any, refusal: Callable[[Any], Exception]
) -> None:
    """Stores `value` under `key`; the same definition imported again replaces itself.

    Args:
        registry (`MutableMapping`): the registry.
        key: the name (or float class) to register under.
        value: the class or function to register.
        refusal (`Callable[[Any], Exception]`): builds the error raised when `key` already holds another
            definition, from that definition.

    Raises:
        The exception built by `refusal` when `key` is taken by another definition.
    """
    existing = registry.get(key)
    if existing is not None and not is_same_definition(existing, value):
        raise refusal(existing)
    registry[key] = value
