"""Name → class (or function) registries that never silently replace another entry."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any


def with_close_matches(unknown: Iterable[Any], known: Iterable[str]) -> str:
    """`'bitz' (did you mean 'bits'?), 'x'`: the unknown names, each with the closest known one when there is one.

    Example:
        >>> with_close_matches(["bitz", "x"], ["bits", "seed"])
        "'bitz' (did you mean 'bits'?), 'x'"
    """
    known = list(known)
    return ", ".join(f"{name!r}{closest_hint(name, known)}" for name in unknown)


def closest_hint(name: Any, known: Iterable[str]) -> str:
    """`" (did you mean 'bits'?)"` for the known name closest to `name`, or `""` when none is close.

    Example:
        >>> closest_hint("tan_q", ["log2", "tanq"]), closest_hint("zzz", ["log2", "tanq"])
        (" (did you mean 'tanq'?)", '')
    """
    hint = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


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
