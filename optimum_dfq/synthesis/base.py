"""The synthesizer interface and registry: calibration sources that make images instead of loading them."""

from __future__ import annotations

import inspect
import numbers
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..calibration.data import CalibrationSet
from ..errors import DFQError, SynthesisError
from ..registry import qualified_name, register_unique, with_close_matches

SYNTHESIZERS: dict[str, type[Synthesizer]] = {}


def register_synthesizer(name: str):
    """Class decorator that registers a [`Synthesizer`] subclass under `name`.

    Registered synthesizers can be built with [`get_synthesizer`] and selected with `quantize(synthesizer=name)`.
    The decorator sets the class's `name` attribute and returns the class itself. A name already taken by another
    class is refused (unregister it first with `del SYNTHESIZERS[name]` to replace it); a class with the same module and
    qualified name (a module reloaded, a notebook cell re-run) replaces itself.

    Args:
        name (`str`): the registry name, e.g. `"psaq"`.

    Returns:
        `Callable[[type[Synthesizer]], type[Synthesizer]]`: the decorator.

    Example:

    ```python
    >>> from optimum_dfq.synthesis import SYNTHESIZERS, GaussianSynthesizer, get_synthesizer, register_synthesizer
    >>> @register_synthesizer("wide-noise")
    ... class WideNoise(GaussianSynthesizer):
    ...     def __init__(self, std: float = 3.0) -> None:
    ...         super().__init__(std=std)
    >>> synth = get_synthesizer("wide-noise")
    >>> synth.name, synth.std
    ('wide-noise', 3.0)
    >>> del SYNTHESIZERS["wide-noise"]  # unregister again
    ```
    """

    def wrapper(cls: type[Synthesizer]) -> type[Synthesizer]:
        register_unique(SYNTHESIZERS, name, cls, lambda existing: SynthesisError(
            f"Synthesizer name {name!r} is already registered to {qualified_name(existing)}; choose another name, or "
            f"unregister it first with `del optimum_dfq.synthesis.SYNTHESIZERS[{name!r}]`."
        ))
        cls.name = name
        SYNTHESIZERS[name] = cls
        return cls

    return wrapper


def get_synthesizer(name: str, **hyperparameters: Any) -> Synthesizer:
    """Instantiates a registered synthesizer by name.

    Built-in names are `"gaussian"`, `"psaq"`, `"sardfq"` and `"dfq-vit"`; more can be added with
    [`register_synthesizer`].

    Args:
        name (`str`): the registry name, e.g. `"gaussian"`.
        **hyperparameters: keyword arguments passed to the synthesizer's constructor, overriding its defaults.

    Returns:
        `Synthesizer`: a new instance of the registered class.

    Raises:
        `SynthesisError`: if `name` is not registered, if a hyper-parameter is not one the synthesizer takes (the
            message lists those it takes, and the closest to a misspelt one), or if the constructor raises a
            `TypeError` or `ValueError` (a value of the wrong type); the message names the hyper-parameters given.
            Errors of the constructor's own checks (`DFQError`s) propagate unchanged.

    Example:

    ```python
    >>> from optimum_dfq.synthesis import get_synthesizer
    >>> synth = get_synthesizer("gaussian", std=0.5)
    >>> type(synth).__name__, synth.hyperparameters()
    ('GaussianSynthesizer', {'mean': 0.0, 'std': 0.5})
    ```
    """
    try:
        cls = SYNTHESIZERS[name]
    except KeyError:
        raise SynthesisError(
            f"Unknown synthesizer {with_close_matches([name], SYNTHESIZERS)}. Available: {sorted(SYNTHESIZERS)}; or "
            "pass real images with `calibration_dataset=`."
        ) from None
    accepted = _hyperparameter_names(cls)
    unknown = [key for key in hyperparameters if accepted is not None and key not in accepted]
    if unknown:
        raise SynthesisError(
            f"Unknown hyper-parameter(s) {with_close_matches(unknown, accepted)} for synthesizer {name!r}; it takes: "
            f"{sorted(accepted)}."
        )
    try:
        return cls(**hyperparameters)
    except DFQError:
        raise
    except (TypeError, ValueError) as err:  # an unknown keyword, or int("abc")/float("fast") on a wrong type
        given = ", ".join(f"{key}={value!r}" for key, value in hyperparameters.items())
        raise SynthesisError(f"Invalid hyper-parameters for synthesizer {name!r} ({given}): {err}") from err


def _hyperparameter_names(cls: type) -> list[str] | None:
    """The keywords `cls(...)` takes: those of its `__init__` and, while an `__init__` takes `**kwargs` (passed on to
    `super().__init__`), of the next one up the class hierarchy; `None` when the last one still takes any keyword."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]  # without self
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names += [p.name for p in parameters if p.kind in named and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return None


def check_synthesis_arguments(num_images: Any, seed: Any) -> None:
    """Refuses an image count that is not a positive `int` or a seed that is not an integer in 0..2**64 - 1 (the
    seeds `quantize` takes), before any work.

    Args:
        num_images: the requested number of images.
        seed: the run's seed.

    Raises:
        `SynthesisError`: naming the argument, what it must be, and the value given.

    Example:
        >>> check_synthesis_arguments(32, 0)
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise SynthesisError(f"num_images must be a positive integer, got {num_images!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SynthesisError(f"seed must be an integer (e.g. seed=0), got {seed!r}.")
    if not 0 <= seed < 2**64:  # the range `quantize` takes, so that a set made with a seed can be remade there
        raise SynthesisError(f"seed={seed} is outside 0..2**64 - 1, the seeds quantize accepts (torch and numpy "
                             "take no others); pass a seed in that range, such as 0.")


class Synthesizer(ABC):
    """Abstract base class of synthesizers, which make a calibration set for a float model without real data.

    Subclasses set their hyper-parameters in `__init__` (with the papers' values as defaults), register themselves
    with [`register_synthesizer`] and implement [`~Synthesizer.synthesize`]. Public instance attributes are the
    hyper-parameters reported by [`~Synthesizer.hyperparameters`].

    Attributes:
        name (`str`): the registry name, set by [`register_synthesizer`] (inherited by subclasses; `""` if no class
            in the hierarchy was registered).

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq import CalibrationSet
    >>> from optimum_dfq.synthesis import Synthesizer
    >>> class Constant(Synthesizer):
    ...     def __init__(self, value: float = 0.0) -> None:
    ...         self.value = value
    ...     def synthesize(self, model, num_images, *, seed=0, image_processor=None):
    ...         return CalibrationSet(torch.full((num_images, 3, 32, 32), self.value), metadata={"seed": seed})
    >>> len(Constant(0.5).synthesize(None, 4)), Constant(0.5).hyperparameters()
    (4, {'value': 0.5})
    ```
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def synthesize(self, model, num_images: int, *, seed: int = 0, image_processor=None) -> CalibrationSet:
        """Returns `num_images` calibration images for `model` (in its normalised input space).

        Args:
            model (`PreTrainedModel`): the float model (left unchanged).
            num_images (`int`): how many images.
            seed (`int`, *optional*, defaults to 0): the run's seed; image `i` must not depend on how many processes
                share the work: only on `(seed, i)` (and, for synthesizers that optimise batches, on its batch of a
                fixed grid, as in [`PixelSynthesizer.synthesize`]).
            image_processor (*optional*): the model's image processor (its mean/std give the valid pixel range).

        Returns:
            `CalibrationSet`: the images, any labels, and provenance metadata.
        """

    def accepts(self, option: str) -> bool:
        """Whether [`synthesize`] takes the keyword `option` (e.g. `"cache_dir"`, `"batch_size"`: synthesizers that
        optimise images in batches take both, Gaussian noise neither).

        Example:
            >>> from optimum_dfq.synthesis import get_synthesizer
            >>> get_synthesizer("gaussian").accepts("cache_dir"), get_synthesizer("psaq").accepts("cache_dir")
            (False, True)
        """
        return option in inspect.signature(self.synthesize).parameters

    def hyperparameters(self) -> dict[str, Any]:
        """The synthesizer's hyper-parameters (recorded in the calibration set's metadata).

        Returns:
            `dict[str, Any]`: every instance attribute whose name does not start with `_`.
        """
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
