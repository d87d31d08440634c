"""The synthesizer interface and registry: calibration sources that make images instead of loading them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..calibration.data import CalibrationSet
from ..errors import SynthesisError

SYNTHESIZERS: dict[str, type[Synthesizer]] = {}


def register_synthesizer(name: str):
    """Class decorator registering a [`Synthesizer`] under `name` (used by `quantize(synthesizer=name)`)."""

    def wrapper(cls: type[Synthesizer]) -> type[Synthesizer]:
        cls.name = name
        SYNTHESIZERS[name] = cls
        return cls

    return wrapper


def get_synthesizer(name: str, **hyperparameters: Any) -> Synthesizer:
    """Instantiates a registered synthesizer.

    Args:
        name (`str`): registry name, e.g. `"gaussian"`.
        hyperparameters: overrides of the synthesizer's defaults.

    Returns:
        `Synthesizer`
    """
    try:
        cls = SYNTHESIZERS[name]
    except KeyError:
        raise SynthesisError(
            f"Unknown synthesizer {name!r}. Available: {sorted(SYNTHESIZERS)}; or pass real images with "
            "`calibration_dataset=`."
        ) from None
    try:
        return cls(**hyperparameters)
    except TypeError as err:
        raise SynthesisError(f"Invalid hyper-parameters for synthesizer {name!r}: {err}") from err


class Synthesizer(ABC):
    """Makes a calibration set for a float model without real data.

    Subclasses set their hyper-parameters in `__init__` (with the papers' values as defaults), register themselves
    with [`register_synthesizer`] and implement [`synthesize`].
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def synthesize(self, model, num_images: int, *, seed: int = 0, image_processor=None) -> CalibrationSet:
        """Returns `num_images` calibration images for `model` (in its normalised input space).

        Args:
            model (`PreTrainedModel`): the float model (left unchanged).
            num_images (`int`): how many images.
            seed (`int`): the run's seed; image `i` must depend only on `(seed, i)`.
            image_processor: the model's image processor (mean/std give the valid pixel range), if known.
        """

    def hyperparameters(self) -> dict[str, Any]:
        """The synthesizer's hyper-parameters (recorded in the calibration set's metadata)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
