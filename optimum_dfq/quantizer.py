"""`DataFreeViTQuantizer`: the user-facing entry point."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from safetensors import SafetensorError
from transformers import PretrainedConfig, PreTrainedModel

from .calibration import CalibrationSet, calibration_set_from_dataset, quantize_model, resolve_input_range
from .calibration.convert import check_convertible
from .calibration.data import (
    check_image_processor,
    check_processor_output_size,
    expected_image_shape,
    is_streaming_dataset,
    load_image_dataset,
)
from .calibration.reparam import get_scale_selector
from .config import QUANT_METHOD, DFQConfig
from .errors import CalibrationError, CheckpointError, ConfigError, DFQError, UnsupportedArchitectureError
from .formats.compressed_tensors import EXPORT_MARKER
from .integrations.transformers import finalize_quantized_model
from .models import get_adapter
from .models.adapters import ADAPTERS
from .synthesis import calibration_set_from_dataset_dict, synthesizer_from_config

logger = logging.getLogger(__name__)


class DataFreeViTQuantizer(OptimumQuantizer):
    """Quantizes Hugging Face ViT, DeiT and Swin image classifiers to low bit widths without real data.

    Calibration images are synthesized from the float model itself (or, for comparison, taken from a real
    dataset). The result is a regular `PreTrainedModel` of the same class whose Linear/Conv layers, post-LayerNorm
    activations and attention matmuls are fake-quantized at RepQ-ViT's sites. **Quantized models run eager attention**
    (the `"optimum_dfq"` attention implementation): the quantizers need the explicit attention probabilities.

    Args:
        model (`PreTrainedModel`, *optional*): the float model to quantize by default.
        image_processor (*optional*): its image processor (mean/std for synthesis, preprocessing of real data).

    Raises:
        `UnsupportedArchitectureError`: when `model` is not a ViT, DeiT or Swin image classifier.

    Example:
        >>> from optimum_dfq import DataFreeViTQuantizer
        >>> quantizer = DataFreeViTQuantizer.from_pretrained("facebook/deit-small-patch16-224")  # doctest: +SKIP
        >>> qmodel = quantizer.quantize(bits="w4a4")  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel | None = None, image_processor: Any | None = None) -> None:
        if model is not None:
            get_adapter(model)
        self.model = model
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(
        cls, model_or_path: PreTrainedModel | str | os.PathLike, image_processor: Any | None = None, *,
        load_image_processor: bool = True, **kwargs: Any
    ) -> DataFreeViTQuantizer:
        """Creates a quantizer for a model instance, a local folder or a Hub id.

        Args:
            model_or_path (`PreTrainedModel`, `str` or `os.PathLike`): the float model, or where to load it from with
                `AutoModelForImageClassification.from_pretrained` (its image processor is loaded from the same place
                when it has one).
            image_processor (*optional*): overrides the loaded image processor.
            load_image_processor (`bool`, *optional*, defaults to `True`): whether to load the image processor from
                `model_or_path` when none is given (and warn when there is none there); `False` for work that needs
                none, such as exporting a quantized model.
            kwargs: forwarded to `from_pretrained` (`revision`, `token`, `cache_dir`, `dtype` (default float32), ...).

        Returns:
            `DataFreeViTQuantizer`

        Raises:
            `UnsupportedArchitectureError`: when the checkpoint's config is not a ViT, DeiT or Swin one (checked before
                any weight is loaded).
            `FileNotFoundError`: when `model_or_path` can only be a local path (`/...`, `./...`, `~/...`, `a/b/c`) and
                no folder is there (transformers would call it a malformed Hub id), or is a folder without
                `config.json` (and no `config=` is given).
            `NotADirectoryError`: when `model_or_path` is a file.
            `CheckpointError`: when a weights file is corrupt or truncated, the checkpoint lacks weights of the
                image classifier (e.g. a backbone-only checkpoint, whose classifier transformers would initialise
                at random), or a local `preprocessor_config.json` cannot be read.
        """
        if isinstance(model_or_path, PreTrainedModel):
            return cls(model_or_path, image_processor)
        from .hub import check_model_folder, local_path_or_hub_id

        check_model_folder(model_or_path, kwargs.get("subfolder") or "", needs_config="config" not in kwargs)
        model_or_path = local_path_or_hub_id(model_or_path)
        from transformers import AutoConfig, AutoModelForImageClassification

        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):  # else the config given is the one the model is built from
            config = AutoConfig.from_pretrained(config if isinstance(config, (str, os.PathLike)) else model_or_path,
                                                **{key: value for key, value in kwargs.items() if key in _HUB_KWARGS})
        _check_supported_config(config)
        kwargs.setdefault("dtype", torch.float32)  # calibration and synthesis run in fp32 (fp16 is slow on CPU)
        kwargs.pop("output_loading_info", None)  # read here: weights the checkpoint lacks are refused
        try:
            model, loading = AutoModelForImageClassification.from_pretrained(model_or_path, output_loading_info=True,
                                                                             **kwargs)
        except SafetensorError as err:
            raise CheckpointError(
                f"{_unreadable_weights_file(model_or_path)} is corrupt or truncated ({err}). Download it again "
                "(from_pretrained(..., force_download=True)) or re-save the model."
            ) from err
        _check_no_missing_weights(model_or_path, model, loading.get("missing_keys") or ())
        if image_processor is None and load_image_processor:
            image_processor = load_saved_image_processor(model_or_path, **kwargs)
        return cls(model, image_processor)

    def quantize(
        self,
        model: PreTrainedModel | None = None,
        bits: str | None = None,
        *,
        config: DFQConfig | None = None,
        synthesizer: str | None = None,
        num_images: int | None = None,
        calibration_dataset: Any | None = None,
        seed: int | None = None,
        image_processor: Any | None = None,
        save_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
        synthesis_device: str | torch.device | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        inplace: bool = False,
    ) -> PreTrainedModel:
        """Returns a quantized copy of `model` (the input model is left unchanged), or with `inplace=True` the model
        itself, quantized.

        A model in half precision (`float16` / `bfloat16`) is copied to float32 first (cast in place with
        `inplace=True`), with a warning: calibration and the fake-quantized model run in float32.

        Args:
            model (`PreTrainedModel`, *optional*): defaults to the quantizer's model.
            bits (`str`, *optional*): bit preset (`"w8a8"`, `"w6a6"`, `"w4a8"`, `"w4a4"`, `"w3a4"`, `"w3a3"`,
                `"w8a16"`, `"w4a16"`, or any `w{2..8}a{2..8|16}`); overrides `config.bits`; default `"w4a4"`.
            config (`DFQConfig`, *optional*): full run definition; the explicit arguments below override its fields.
            synthesizer (`str`, *optional*): calibration-image synthesizer (`"dfq-vit"` by default, `"sardfq"`,
                `"psaq"`, `"gaussian"`, ...); refused together with real data (`calibration_dataset` here or in the
                config), which it would not be used with.
            num_images (`int`, *optional*): number of calibration images to synthesize or to draw from an image
                dataset (default 32). A tensor, [`CalibrationSet`] or saved set of pixel values is used whole (the
                stored config records its size); an explicit `num_images` that disagrees with its size is refused.
            calibration_dataset (*optional*): real calibration data instead of synthesis: a `datasets.Dataset` with an
                image column (preprocessed with the image processor), a [`CalibrationSet`], or a `[N, C, H, W]` tensor
                of already-normalised pixel values.
            seed (`int`, *optional*): seed of synthesis and image selection (default 0).
            image_processor (*optional*): overrides the quantizer's image processor.
            save_dir (`str` or `os.PathLike`, *optional*): also `save_pretrained` the quantized model there: a new
                folder or an earlier quantized output (a folder holding another model, such as the float one, is
                refused before any work).
            cache_dir (`str`, `os.PathLike` or `bool`, *optional*): synthesis cache of a synthesizer that optimises
                images: a finished set with identical arguments is reused, an interrupted synthesis resumes with the
                batches it has not finished. Defaults to the library's cache (`$HF_HOME/optimum_dfq/synthesis`, or
                `$OPTIMUM_DFQ_CACHE/synthesis`); `False` keeps nothing (see
                [`~optimum_dfq.synthesis.cache.resolve_cache_dir`]).
            synthesis_device (`str` or `torch.device`, *optional*): where a synthesizer that optimises images runs
                (the model is moved there for the synthesis and back; e.g. `PartialState().device` under a
                launcher); the model's own device by default. Calibration runs on the model's device.
            image_column (`str`, *optional*): the `Image` column of a calibration image dataset (given, or the
                config's `calibration_dataset`, whose own `image_column` it replaces); needed when it has several.
            label_column (`str`, *optional*): the `ClassLabel` or integer column to read the calibration labels
                from (calibration does not use them); needed to keep labels when it has several `ClassLabel` columns
                (then none are read without it).
            inplace (`bool`, *optional*, defaults to `False`): quantize `model` itself instead of a copy (saves the
                copy's memory; `from_pretrained(..., quantization_config=DFQConfig(...))` quantizes the model it
                loaded this way). The result is the same as a copy's; if quantization fails, `model` is left partly
                converted and should be discarded.

        Returns:
            `PreTrainedModel`: same class and outputs as the input (the input object itself with `inplace=True`);
            `model.config.quantization_config` is the [`DFQConfig`] of the run. Its weights are frozen to packed
            integer codes and it carries `model.hf_quantizer`, so `save_pretrained` / `push_to_hub` write checkpoints
            that `AutoModelForImageClassification.from_pretrained` reloads bit-exactly (after `import optimum_dfq`).

        Raises:
            `ConfigError`: no model to quantize, a `config` that is not a [`DFQConfig`], `synthesizer` together with
                real data, a `num_images` that disagrees with the size of a given set, a `modules_to_not_convert`
                entry that matches no layer, an unregistered scale selector, a `cache_dir` folder for a
                synthesizer without a cache or for real data, a `seed` outside 0..2**64 - 1, a path given as the image
                processor, or a `save_dir` that is a file or holds a model that is not a quantized one.
            `BitPresetError`: an unknown or ill-formed `bits` preset.
            `UnsupportedArchitectureError`: `model` is not a ViT, DeiT or Swin image classifier.
            `ImageSizeError`: the image processor or the calibration images do not have the model's image size.
            `CalibrationError`: NaN/inf weights, empty or malformed calibration data (including raw pixels cast to
                float, or beyond the image processor's output range), an image dataset with several image columns
                and none chosen, a chosen column that is missing or of another type, or non-finite activations.
            `SynthesisError`: an unknown synthesizer, invalid synthesizer hyper-parameters, or a failed synthesis.

        Example:

        ```python
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from optimum_dfq import DataFreeViTQuantizer
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=10))
        >>> qmodel = DataFreeViTQuantizer(model).quantize(bits="w4a8", synthesizer="gaussian", num_images=4)
        >>> config = qmodel.config.quantization_config
        >>> type(qmodel).__name__, config.bits, config.num_images
        ('ViTForImageClassification', 'w4a8', 4)
        ```
        """
        model = model if model is not None else self.model
        if model is None:
            raise ConfigError("No model to quantize: pass `model=` or create the quantizer with from_pretrained(...).")
        adapter = get_adapter(model)
        config = self._resolve_config(config, bits, synthesizer, num_images, seed)
        if calibration_dataset is None and config.calibration_dataset:  # the saved config names the columns used
            config = config.with_dataset_columns(image_column, label_column)
        if synthesizer is not None and (calibration_dataset is not None or config.calibration_dataset):
            given = "calibration_dataset=" if calibration_dataset is not None else (
                f"the config's calibration_dataset={config.calibration_dataset!r}")
            raise ConfigError(
                f"synthesizer={synthesizer!r} would not be used: the images come from {given}. Drop synthesizer= to "
                "calibrate on those images, or drop the dataset (config.replace(calibration_dataset={})) to "
                "synthesize."
            )
        check_convertible(model, adapter, config.modules_to_not_convert)
        _check_finite_parameters(model)
        if save_dir is not None:
            _check_save_dir(save_dir)
        get_scale_selector(config.scale_selector)
        image_processor = image_processor if image_processor is not None else self.image_processor
        check_image_processor(image_processor)
        if image_processor is not None:
            check_processor_output_size(image_processor, expected_image_shape(model))

        qmodel = _float32_model(model if inplace else copy.deepcopy(model), inplace)
        # the run draws from its own seeded stream; the caller's random state is restored afterwards
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(config.seed)
            calibration = self.calibration_set(qmodel, config, calibration_dataset, image_processor, cache_dir,
                                               synthesis_device, image_column=image_column, label_column=label_column)
            config = _record_image_count(config, len(calibration), requested=num_images)
            config, input_normalization = resolve_input_range(config, image_processor)
            _, plan = quantize_model(qmodel, calibration, config, input_normalization)
        finalize_quantized_model(qmodel, config, plan, base_model=model.name_or_path,
                                 calibration={**calibration.metadata, "num_images": len(calibration)},
                                 image_processor=image_processor)
        if save_dir is not None:
            qmodel.save_pretrained(save_dir)
            if image_processor is not None:
                image_processor.save_pretrained(save_dir)
        return qmodel

    def push_to_hub(
        self,
        qmodel: PreTrainedModel,
        repo_id: str,
        *,
        eval_results: Any | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Uploads a quantized model, the image processor's config and a model card to the Hub.

        The card says how to load the model (with the `import optimum_dfq` line), the recipe, the bits, the
        data-free calibration and, when given, the evaluation results as `model-index`.

        Args:
            qmodel (`PreTrainedModel`): a model returned by [`~DataFreeViTQuantizer.quantize`] (or loaded quantized).
            repo_id (`str`): `"org/name"`; created if it does not exist.
            eval_results (`list[huggingface_hub.EvalResult]`, *optional*): e.g. from
                `optimum_dfq.hub.accuracy_eval_results(evaluate_accuracy(...), dataset_id=...)`.
            base_model (`str`, *optional*): the float model's Hub id (defaults to the one it was loaded from).
            kwargs: forwarded to [`optimum_dfq.hub.push_to_hub`] (`private`, `token`, `commit_message`, ...).

        Returns:
            `huggingface_hub.CommitInfo`

        Example:
            >>> quantizer.push_to_hub(qmodel, "my-org/deit-small-w4a4-dfq")  # doctest: +SKIP
        """
        from .hub import push_to_hub

        kwargs.setdefault("image_processor", self.image_processor)
        return push_to_hub(qmodel, repo_id, eval_results=eval_results, base_model=base_model, **kwargs)

    @staticmethod
    def _resolve_config(
        config: DFQConfig | None, bits: str | None, synthesizer: str | None, num_images: int | None, seed: int | None
    ) -> DFQConfig:
        if config is not None and not isinstance(config, DFQConfig):
            raise ConfigError(
                f"config must be a DFQConfig, got {type(config).__name__}. Build one with DFQConfig(...), "
                "DFQConfig.from_dict(...) or DFQConfig.from_yaml('default')."
            )
        config = config or DFQConfig()
        overrides = {
            key: value
            for key, value in {"bits": bits, "synthesizer": synthesizer, "num_images": num_images, "seed": seed}.items()
            if value is not None
        }
        config = config.replace(**overrides) if overrides else config
        if not 0 <= config.seed < 2**64:
            raise ConfigError(
                f"seed={config.seed} is outside 0..2**64 - 1, the seeds that both torch (below 2**64) and numpy's "
                "dataset sampling (non-negative) accept; pass a seed in that range, such as 0."
            )
        _warn_unused_activation_options(config)
        return config

    @staticmethod
    def calibration_set(
        model: PreTrainedModel,
        config: DFQConfig,
        calibration_dataset: Any | None,
        image_processor: Any | None,
        cache_dir: str | os.PathLike | bool | None = None,
        synthesis_device: str | torch.device | None = None,
        *,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> CalibrationSet:
        """Builds the calibration set of a run: synthesized, or from the given real data.

        Args:
            model (`PreTrainedModel`): the float model (synthesis inverts it; its image size is checked).
            config (`DFQConfig`): the run's config (`synthesizer`, `synthesizer_kwargs`, `num_images`, `seed`, and
                `calibration_dataset` when `calibration_dataset` is `None`).
            calibration_dataset (*optional*): real data as accepted by [`~DataFreeViTQuantizer.quantize`]; `None`
                synthesizes (or loads `config.calibration_dataset`).
            image_processor (*optional*): the model's image processor.
            cache_dir (`str`, `os.PathLike` or `bool`, *optional*): synthesis cache folder; `None` for the default
                one, `False` for none.
            synthesis_device (`str` or `torch.device`, *optional*): where a synthesizer that optimises images runs.
            image_column (`str`, *optional*): the `Image` column of an image dataset (by default the one of
                `config.calibration_dataset`, if it names one, when that dataset is loaded).
            label_column (`str`, *optional*): the `ClassLabel` or integer label column of an image dataset (likewise).

        Returns:
            [`CalibrationSet`]: the images, checked against the model's image size.

        Raises:
            `CalibrationError`: malformed, empty or streaming calibration data; an image dataset whose image column is
                ambiguous, or a chosen column that is missing or of another type.
            `ConfigError`: a `cache_dir` folder for a synthesizer without a cache, or with real data;
                `image_column` / `label_column` without an image dataset to read them from.
            `ImageSizeError`: images of another size than the model's.
            `SynthesisError`: an unknown synthesizer or a failed synthesis.
        """
        explicit_cache = cache_dir is not None and not isinstance(cache_dir, bool)
        if explicit_cache and (calibration_dataset is not None or config.calibration_dataset):
            raise ConfigError(f"cache_dir={cache_dir!r} keeps synthesized images, but this run calibrates on real "
                              "data; drop cache_dir=.")
        if calibration_dataset is None and config.calibration_dataset:
            spec = config.calibration_dataset
            calibration_dataset = load_image_dataset(spec["path"], spec.get("split"), spec.get("name"))
            image_column = image_column if image_column is not None else spec.get("image_column")
            label_column = label_column if label_column is not None else spec.get("label_column")
        columns = {"image_column": image_column, "label_column": label_column}
        if (source := _pixel_source(calibration_dataset)) is not None:
            _check_no_columns_chosen(columns, source)
        if calibration_dataset is None:
            synthesizer = synthesizer_from_config(config)
            extra = {}
            if explicit_cache and not synthesizer.accepts("cache_dir"):
                raise ConfigError(f"Synthesizer '{config.synthesizer}' has no cache; drop cache_dir=.")
            if synthesizer.accepts("cache_dir"):
                extra["cache_dir"] = cache_dir
            if synthesis_device is not None and synthesizer.accepts("device"):
                extra["device"] = synthesis_device
            calibration = synthesizer.synthesize(model, config.num_images, seed=config.seed,
                                                 image_processor=image_processor, **extra)
        elif isinstance(calibration_dataset, CalibrationSet):
            calibration = calibration_dataset
            _check_not_raw_pixels(calibration.pixel_values, image_processor)
        elif isinstance(calibration_dataset, torch.Tensor):
            calibration = CalibrationSet(pixel_values=calibration_dataset)  # refuses raw (integer) pixels
            calibration.pixel_values = calibration.pixel_values.float()
            _check_not_raw_pixels(calibration.pixel_values, image_processor)  # and raw pixels cast to float
        elif is_streaming_dataset(calibration_dataset):
            raise CalibrationError(
                "calibration_dataset is a streaming datasets.IterableDataset, whose images cannot be counted or "
                "sampled with a seed. Take the images first: `Dataset.from_list(list(dataset.take(n)))`, with the "
                "features of the original (`features=dataset.features`), or load the split without streaming=True."
            )
        elif hasattr(calibration_dataset, "features") and "pixel_values" in calibration_dataset.features:
            calibration = calibration_set_from_dataset_dict(calibration_dataset)  # a saved synthetic set
        elif hasattr(calibration_dataset, "features"):
            calibration = calibration_set_from_dataset(
                calibration_dataset, image_processor, config.num_images, seed=config.seed,
                num_channels=expected_image_shape(model)[0], **columns,
            )
        elif _is_dataset_dict(calibration_dataset):
            splits = list(calibration_dataset)
            raise CalibrationError(
                f"calibration_dataset is a DatasetDict with splits {splits}; pass one split, e.g. "
                f"calibration_dataset=dataset[{splits[0] if splits else 'train'!r}] (or load_dataset(..., split=...))."
            )
        else:
            raise CalibrationError(
                f"calibration_dataset must be a datasets.Dataset, a CalibrationSet or a pixel tensor, got "
                f"{type(calibration_dataset).__name__}."
            )
        calibration.check_image_size(model)
        return calibration


_ACTIVATION_ONLY_FIELDS = ("input_bits", "input_range", "activation_observer", "activation_percentiles",
                           "post_layernorm", "scale_selector", "quantize_attention", "post_softmax")


def _warn_unused_activation_options(config: DFQConfig) -> None:
    """A weight-only preset keeps activations in float, so options of activation quantizers have no effect."""
    if config.activation_bits is not None:
        return
    defaults = DFQConfig()
    unused = [name for name in _ACTIVATION_ONLY_FIELDS if getattr(config, name) != getattr(defaults, name)]
    if unused:
        logger.warning("bits=%r is weight-only (activations stay float), so %s have no effect; choose a preset "
                       "with activation bits (e.g. 'w4a8') to use them.", config.bits,
                       ", ".join(f"{name}={getattr(config, name)!r}" for name in unused))


def _pixel_source(calibration_dataset: Any) -> str | None:
    """Where calibration images come from when no image dataset is read (`None` otherwise, or for data that
    `calibration_set` refuses anyway)."""
    if calibration_dataset is None:
        return "synthesized"
    if isinstance(calibration_dataset, (CalibrationSet, torch.Tensor)):
        return f"given as a {type(calibration_dataset).__name__} of pixel values"
    if hasattr(calibration_dataset, "features") and "pixel_values" in calibration_dataset.features:
        return "a saved set of preprocessed pixel_values"
    return None


def _check_no_columns_chosen(columns: dict[str, str | None], source: str) -> None:
    """Refuses `image_column` / `label_column` when the calibration images do not come from an image dataset."""
    chosen = [f"{key}={value!r}" for key, value in columns.items() if value is not None]
    if chosen:
        raise ConfigError(
            f"{' and '.join(chosen)} would not be used: the calibration images are {source}, not read from an "
            "image dataset. Drop it, or pass the image dataset (calibration_dataset=) it is a column of."
        )


def _is_dataset_dict(value: Any) -> bool:
    import datasets

    return isinstance(value, datasets.DatasetDict)


def _check_save_dir(save_dir: str | os.PathLike) -> None:
    """Refuses a `save_dir` that is a file (transformers' `save_pretrained` logs an error and saves nothing) or that
    holds a model other than an optimum_dfq quantized one, typically the float model itself, which saving would
    overwrite. An earlier quantized output (native, or exported to compressed-tensors) is replaced, as
    `save_pretrained` does."""
    path = Path(save_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"save_dir {save_dir} is a file; pass a folder (a new one, or an earlier quantized output).")
    try:
        stored = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        stored = None
    quantization = stored.get("quantization_config") if isinstance(stored, dict) else None
    ours = isinstance(quantization, dict) and (quantization.get("quant_method") == QUANT_METHOD
                                               or isinstance(stored.get(EXPORT_MARKER), dict))
    if not ours:
        raise ConfigError(
            f"save_dir {save_dir} holds a model that is not a quantized one (its config.json has no optimum_dfq "
            "quantization_config: the float model being quantized?), and saving there would overwrite it. Pass a new "
            "folder, or an earlier quantized output to replace."
        )


def _check_not_raw_pixels(pixel_values: torch.Tensor, image_processor: Any | None) -> None:
    """Refuses given pixel values that are raw pixels, not the output of an image processor that rescales (one that
    does not rescale can make them: its model takes such values, and they pass):

    - whole numbers in 0..255, not all 0 or 1: raw 8-bit pixels cast to float;
    - with the processor at hand, non-negative values whose maximum is beyond twice the largest value its rescaling
      and normalisation can produce (`(1 - mean) / std`): raw pixels that were resized or filtered as floats. Pixels
      with negative values (normalised images, Gaussian noise) are not judged by their range."""
    if image_processor is not None and getattr(image_processor, "do_rescale", False) is not True:
        return
    low, high = float(pixel_values.min()), float(pixel_values.max())
    fix = ("pixel values normalised by the model's image processor (image_processor(images, "
           "return_tensors='pt').pixel_values). To calibrate on raw images, pass a datasets.Dataset of them.")
    if 0 <= low and 1 < high <= 255 and torch.equal(pixel_values, pixel_values.round()):
        raise CalibrationError(f"The calibration pixel values are whole numbers from {low:g} to {high:g}: raw pixels "
                               f"cast to float, not {fix}")
    largest = _largest_processed_pixel(image_processor, pixel_values.shape[1]) if image_processor is not None else None
    if largest is not None and 0 <= low and high > 2 * largest:
        raise CalibrationError(
            f"The calibration pixel values run from {low:g} to {high:g}, but the image processor's rescaling and "
            f"normalisation produce at most {largest:.3g}: raw pixels, not {fix}"
        )


def _largest_processed_pixel(image_processor: Any, num_channels: int) -> float | None:
    """The largest value a rescaling image processor can output, `max((1 - mean) / std)`, or `None` when its
    statistics cannot be read."""
    from .synthesis.normalization import normalization_stats, valid_pixel_range

    try:
        mean, std = normalization_stats(image_processor, num_channels=num_channels)
    except DFQError:
        return None
    return float(valid_pixel_range(mean, std)[1].max())


def _record_image_count(config: DFQConfig, count: int, requested: int | None) -> DFQConfig:
    """The config with the number of images calibration really used: a given tensor, `CalibrationSet` or saved set
    is used whole, so an explicit `num_images` that disagrees with it is an error, not a silent subsample."""
    if count == config.num_images:
        return config
    if requested is not None:
        raise ConfigError(
            f"num_images={requested} but the given calibration_dataset holds {count} images, and a tensor, "
            "CalibrationSet or saved pixel_values set is used whole. Pass the images to use (e.g. "
            f"`pixel_values[:{requested}]`) or drop num_images."
        )
    logger.info("Calibrating on all %d images of the given calibration set (DFQConfig.num_images=%d applies to "
                "synthesis and to image datasets); the stored config records %d.", count, config.num_images, count)
    return config.replace(num_images=count)


def _unreadable_weights_file(source: str) -> str:
    """The first safetensors file of a local model folder that does not open (else a description of `source`'s)."""
    from safetensors import safe_open

    for path in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else ():
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return str(path)
    return f"A weights file of {source}"


def _check_no_missing_weights(source: str, model: PreTrainedModel, missing: Any) -> None:
    """Refuses a checkpoint that lacks parameters (typically the classifier's, in a backbone-only checkpoint):
    transformers initialises them at random and only prints a load report, and quantizing such a model gives a saved
    model that predicts noise. Missing buffers (computed from the config) are not refused."""
    parameters = {name for name, _ in model.named_parameters()}
    names = sorted(name for name in missing if name in parameters)  # a buffer missing is rebuilt from the config
    if not names:
        return
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    saved_as = ", ".join(getattr(model.config, "architectures", None) or []) or "unknown"
    raise CheckpointError(
        f"{source} has no weights for {shown} (it was saved as {saved_as}); {type(model).__name__} would initialise "
        "them at random, and the quantized model would predict noise. Pass a checkpoint fine-tuned for image "
        "classification (its config.json lists a *ForImageClassification architecture), or fine-tune one first."
    )


def _check_finite_parameters(model: PreTrainedModel) -> None:
    """Refuses a model with NaN/inf weights before any image is synthesized (calibrating it cannot succeed)."""
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
            raise CalibrationError(
                f"The float model's parameter {name} holds NaN or inf values, so no calibration can make a usable "
                "quantized model of it. Check the checkpoint (or the training run that wrote it)."
            )



_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder", "proxies")


def _check_supported_config(config: Any) -> None:
    """Refuses a checkpoint of an architecture the library does not quantize, before its weights are loaded."""
    supported = {model_class.config_class for model_class in ADAPTERS}
    if type(config) not in supported:
        names = ", ".join(sorted(model_class.__name__ for model_class in ADAPTERS))
        raise UnsupportedArchitectureError(
            f"The checkpoint is a {type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}); "
            f"optimum_dfq quantizes only these architectures: {names}. Pass a ViT, DeiT or Swin image classifier."
        )


def _float32_model(qmodel: PreTrainedModel, inplace: bool) -> PreTrainedModel:
    """The model that gets quantized (a copy, or the input model `inplace`), upcast to float32 (with a warning) if it
    is in half precision."""
    dtypes = {p.dtype for p in qmodel.parameters() if p.is_floating_point()}
    if not dtypes <= {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        how = ("it is cast to float32 in place, then calibrated and quantized" if inplace else
               "it is calibrated and quantized as a float32 copy (the input model is left unchanged)")
        logger.warning("The model's parameters are %s; %s, and the quantized model runs in float32.", names, how)
        qmodel.float()
        qmodel.config.dtype = torch.float32
    return qmodel


def load_saved_image_processor(model_or_path: str | os.PathLike, **kwargs: Any) -> Any | None:
    """The image processor saved with a float model, or `None`, with a warning, when it has none.

    [`DataFreeViTQuantizer.from_pretrained`] loads it this way, and so does `from_pretrained(...,
    quantization_config=DFQConfig(...))`. Without one, `quantize()` resolves `input_range="auto"` to `"calibrated"`
    (and refuses options that need the processor's statistics).

    Args:
        model_or_path (`str` or `os.PathLike`): a local model folder or a Hub id.
        kwargs: forwarded to `AutoImageProcessor.from_pretrained` (`revision`, `cache_dir`, `subfolder`, ...).

    Returns:
        The image processor, or `None`.

    Raises:
        `CheckpointError`: a local `preprocessor_config.json` that is there but cannot be read.

    Example:
        >>> import tempfile
        >>> from transformers import ViTImageProcessor
        >>> folder = tempfile.mkdtemp()
        >>> _ = ViTImageProcessor(image_mean=[0.25, 0.25, 0.25]).save_pretrained(folder)
        >>> list(load_saved_image_processor(folder).image_mean)
        [0.25, 0.25, 0.25]
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_or_path, **kwargs)
    except OSError as err:
        written = Path(model_or_path, kwargs.get("subfolder") or "", "preprocessor_config.json")
        if written.is_file():  # there, but unreadable: not the same as having none
            raise CheckpointError(
                f"{written} cannot be read ({err}); fix or replace it, e.g. with the float model's "
                "image_processor.save_pretrained(<folder>)."
            ) from err
        logger.warning("%s has no image processor; pass image_processor= for real-data calibration.", model_or_path)
        return None
