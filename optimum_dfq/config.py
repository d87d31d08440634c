"""`DFQConfig`: everything that defines a quantization run, as one versioned, serialisable object.

The same object is the run's recipe (YAML), the `quantization_config` written into `config.json`, and what
`DataFreeViTQuantizer.quantize` reads. It subclasses transformers' `QuantizationConfigMixin` so that a quantized
model carries it like any other Hugging Face quantization config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import BitPresetError, CheckpointError, ConfigError
from .registry import closest_hint, with_close_matches
from .version import FORMAT_VERSION, __version__

QUANT_METHOD = "optimum_dfq"

#: Named presets. Any `w{2..8}a{2..8}` or `w{2..8}a16` string is accepted too; these are the documented ones.
BIT_PRESETS: dict[str, tuple[int, int | None]] = {
    "w8a8": (8, 8),
    "w6a6": (6, 6),
    "w4a8": (4, 8),
    "w4a4": (4, 4),
    "w3a4": (3, 4),
    "w3a3": (3, 3),
    "w8a16": (8, None),
    "w4a16": (4, None),
}

_PRESET_RE = re.compile(r"^w(\d+)a(\d+)$")
MIN_BITS, MAX_BITS = 2, 8

OBSERVERS = ("percentile_mse", "minmax")
ACTIVATION_OBSERVERS = ("auto", *OBSERVERS)
INPUT_RANGES = ("auto", "pixels", "calibrated")
POST_LAYERNORM_MODES = ("per_channel_reparam", "per_tensor", "per_channel")
POST_SOFTMAX_QUANTIZERS = ("auto", "log_sqrt2", "log2", "uniform", "tanq")
#: Built-in scale selectors; `optimum_dfq.calibration.register_scale_selector` adds more.
SCALE_SELECTORS = ("mean", "median", "mad", "search")
#: Roles of the Linear layers whose input the activation correction can fix (see `calibration/sites.py`).
CORRECTION_SITES = ("qkv", "o_proj", "fc1", "fc2", "reduction", "classifier")
CORRECTION_KINDS = ("affine", "ridge")
AFFINE_FITS = ("least_squares", "moments")
RIDGE_FITS = ("residual", "direct")
#: Defaults of `DFQConfig.correction` (filled in for the keys a recipe leaves out).
CORRECTION_DEFAULTS: dict[str, Any] = {
    "kind": "affine",
    "sites": ["qkv", "o_proj", "fc1", "fc2"],
    "affine_fit": "least_squares",
    "ridge_lambda": 1e-2,
    "ridge_fit": "residual",
    "fold": None,  # resolved: True for "affine", False for "ridge"
    "max_tokens": 8192,
}
#: Defaults of `DFQConfig.reconstruction` (I&S-ViT: Adam, lr 4e-5, cosine decay, 1000 iterations).
RECONSTRUCTION_DEFAULTS: dict[str, Any] = {"iterations": 1000, "lr": 4e-5, "batch_size": 32}
CALIBRATION_ORDERS = ("sequential", "parallel")
CALIBRATION_DATASET_KEYS = ("path", "split", "name", "image_column", "label_column")
DEFAULT_PERCENTILES = (0.999, 0.9999, 0.99999)


def parse_bits(bits: str) -> tuple[int, int | None]:
    """Parses a bit preset such as `"w4a4"` into `(weight_bits, activation_bits)`.

    Args:
        bits (`str`): `"w{W}a{A}"` with W in 2..8 and A in 2..8, or A = 16 for weight-only quantization.

    Returns:
        `tuple[int, int | None]`: the weight bits and the activation bits (`None` means activations stay float).

    Example:
        >>> parse_bits("w4a8")
        (4, 8)
        >>> parse_bits("w4a16")
        (4, None)
    """
    if not isinstance(bits, str):
        raise BitPresetError(f"Bit preset must be a string like 'w4a4', got {type(bits).__name__} {bits!r}.")
    match = _PRESET_RE.match(bits.strip().lower())
    if match is None:
        raise BitPresetError(
            f"Unknown bit preset {bits!r}. Use 'w<weight bits>a<activation bits>', e.g. one of "
            f"{', '.join(BIT_PRESETS)} (a16 means weight-only)."
        )
    weight_bits, activation_bits = int(match.group(1)), int(match.group(2))
    if not MIN_BITS <= weight_bits <= MAX_BITS:
        raise BitPresetError(
            f"Weight bits {weight_bits} in preset {bits!r} are outside {MIN_BITS}..{MAX_BITS}; choose e.g. 'w4a4'."
        )
    if activation_bits == 16:
        return weight_bits, None
    if not MIN_BITS <= activation_bits <= MAX_BITS:
        raise BitPresetError(
            f"Activation bits {activation_bits} in preset {bits!r} are outside {MIN_BITS}..{MAX_BITS} "
            "(or 16 for weight-only); choose e.g. 'w4a8'."
        )
    return weight_bits, activation_bits


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"DFQConfig.{name}={value!r}{closest_hint(value, choices)} is not one of {list(choices)}.")


@dataclass
class DFQConfig(QuantizationConfigMixin):
    """Definition of a data-free quantization run (and the `quantization_config` of the quantized model).

    Args:
        bits (`str`, defaults to `"w4a4"`): bit preset, see [`parse_bits`].
        input_bits (`int`, defaults to 8): bits of the image-input quantizer of the patch embedding (RepQ-ViT keeps
            it at 8 whatever the preset).
        input_range (`str`, defaults to `"auto"`): levels of the image-input quantizer. `"pixels"`: per channel, the
            normalised values of the `2^input_bits` evenly spaced raw pixel values, taken from the image processor's
            `image_mean`/`image_std` (no calibration; at 8 bits an 8-bit image passes unchanged, see
            `quantizers/pixel.py`). `"calibrated"`: one range for all channels, from the calibration images with the
            activation observer (RepQ-ViT). `"auto"` is resolved by `DataFreeViTQuantizer.quantize`: `"pixels"` when
            it has an image processor that rescales 8-bit pixels by 1/255, else `"calibrated"`; the quantized model's
            config stores the resolved value (a stored `"auto"`, from checkpoints older than this option, loads as
            `"calibrated"`).
        weight_observer (`str`, defaults to `"percentile_mse"`): range estimator of weight quantizers
            (`"percentile_mse"` or `"minmax"`).
        weight_symmetric (`bool`, defaults to `False`): symmetric (zero point 0) instead of asymmetric weights.
        weight_percentiles (`list[float]`): candidate upper percentiles of the percentile-MSE search for weights.
        activation_observer (`str`, defaults to `"auto"`): range estimator of activation quantizers
            (`"percentile_mse"`, `"minmax"`, or `"auto"`: `"minmax"` when the preset's activations have 8 bits or more,
            `"percentile_mse"` below). At 8 bits the rounding step is fine enough that clipping costs more than it
            saves: on the reference ViT at W8A8 (32 real images) the percentile-MSE search clips, above all, the
            attention keys, whose few large values decide where attention goes. With min/max ranges the logit MSE
            falls from 8.8e-4 to 7.2e-4 and the mean agreement rises from 99.02% to 99.08% (6 calibration draws,
            first 2000 CIFAR-10 test images, `benchmarks/results/w8a8_agreement.md`); DFQ-ViT-calibrated Swin gained
            0.63 (W8A8) and 0.58 (W4A8) points of top-1 when min/max became the 8-bit default (commit d187035,
            `benchmarks/results/accuracy.md` there against its parent). Below 8 bits clipping pays, and
            percentile-MSE stays. One site keeps percentile-MSE at 8 bits too (**our** choice): the input of a Linear
            fed by an activation function (fc2, after GELU), whose rare large values are isolated outliers of a
            one-sided distribution; see `post_activation_range_observer`.
        activation_percentiles (`list[float]`): candidate percentiles for activations.
        post_layernorm (`str`, defaults to `"per_channel_reparam"`): treatment of post-LayerNorm activations (inputs
            of q/k/v, fc1 and Swin's patch-merging reduction): calibrated per channel then re-parameterised to per
            tensor (RepQ-ViT), plain per tensor, or kept per channel (not integer-friendly; for ablations).
        scale_selector (`str`, defaults to `"mean"`): how the layer-wise scale is chosen from the channel scales when
            re-parameterising (`"mean"` = RepQ-ViT; `"median"` and `"mad"` = our reading of DopQ-ViT's MOSF;
            `"search"` = our reading of DopQ-ViT v2's SOSF, a search on the consumers' output error), or a name added
            with `optimum_dfq.calibration.register_scale_selector`.
        round_zero_point (`bool`, defaults to `True`): round the re-parameterised zero point to an integer (RepQ-ViT's
            code leaves it fractional; integer deployment needs it rounded; FP equivalence holds either way).
        quantize_attention (`bool`, defaults to `True`): quantize both attention matmuls (Q, K, softmax output, V).
        post_softmax (`str`, defaults to `"auto"`): quantizer of the attention probabilities (`"log_sqrt2"`,
            `"log2"`, `"uniform"`, or `"tanq"`: our interpretation of DopQ-ViT's tangent quantizer). `"auto"` is
            `"log_sqrt2"` (RepQ-ViT) from 4 to 7 activation bits and `"tanq"` at 8 bits and more and at 3 bits and
            fewer (**our** choice). At 3 bits log-√2 has 8 non-zero levels spanning only [Δ/11, Δ], so its scale Δ
            (chosen by probability MSE) trades clipped large probabilities against zeroed small ones and depends on
            the calibration images; TanQ spans [0, 1] and is calibrated on the A·V error. At W3A3 with DFQ-ViT
            calibration TanQ scores 62.03 vs 59.87 (DeiT), 62.99 vs 59.49 (Swin) and 65.95 vs 66.03 (ViT) on the
            CIFAR-10 test split (`benchmarks/results/w3a3/accuracy.md`); at W4A4 the two are level
            (`benchmarks/results/accuracy.md`, ablations). Log-√2 levels are √2
            apart whatever the bit width (a relative error of up to 19% on large probabilities); 8-bit uniform steps
            of 1/255 are too coarse for the many probabilities near 1/N; TanQ puts fine steps near 0 and near 1. On
            the reference ViT at W8A8 the logit MSE against the float model is 7.2e-4 with uniform and 5.0e-4 with
            TanQ (6 calibration draws, `benchmarks/results/w8a8_agreement.md`). TanQ's codebook is not uniform, so
            ONNX export runs it (and the A·V matmul) as float ops, and the default W8A8 ONNX graph is slower than
            the FP32 one (1.74x on a ViT-Small shape at batch 32 on an AVX2 CPU,
            `benchmarks/results/inference_speed.md`); `"uniform"` (range from an exact 0, with
            `input_range="calibrated"`: `recipes/w8a8_integer_onnx.yaml`) lowers the whole W8A8 graph to integer QDQ
            (0.72x there, 0.40x on an AVX-512 VNNI CPU).
        calibration_order (`str`, defaults to `"sequential"`): `"sequential"` calibrates each quantizer on inputs
            produced by the already-quantized prefix of the network (RepQ-ViT's behaviour, the whole calibration set
            in one forward pass); `"parallel"` observes every activation quantizer on the weight-quantized network with
            float activations, in batches.
        calibration_batch_size (`int`, defaults to 32): batch size of forward passes in `"parallel"` calibration.
        synthesizer (`str`, defaults to `"dfq-vit"`): name of the calibration-image synthesizer. The default is the
            data-free source with the best mean over the reference models at W4A4 and W3A4 in the accuracy
            benchmark, level with PSAQ-ViT's from W8A8 to W4A4 (`benchmarks/results/accuracy.md`);
            synthesizers that optimise pixels need the model's normalisation (pass the image processor, which
            `DataFreeViTQuantizer.from_pretrained` loads). `"gaussian"` needs nothing and takes no time.
        synthesizer_kwargs (`dict`): hyper-parameters of the synthesizer (its defaults otherwise).
        calibration_dataset (`dict`): real-data calibration instead of synthesis (for comparisons and for
            reproducing real-data baselines): `{"path": <dataset folder, parquet file or Hub id>, "split": "train"}`,
            optionally with `"name"` (configuration), `"image_column"` and `"label_column"` (needed for a dataset
            with several image or `ClassLabel` columns). Without `"split"`: `"train"`, or the split a `save_to_disk`
            folder of one split was saved as. Empty (the default) means data-free.
        num_images (`int`, defaults to 32): number of calibration images.
        seed (`int`, defaults to 0): seed of synthesis and calibration.
        modules_to_not_convert (`list[str]`): in-memory module names (or `"re:"` + a regular expression matched
            against the whole name) of patch embeddings, Linears, LayerNorms (their output quantizer) or attention
            modules (their q/k/softmax/v quantizers) kept in float. An entry that matches none of them is refused
            when quantizing.
        correction (`dict`): activation correction after calibration (our interpretation of DFQ-ViT's activation
            correction matrix); empty = off. Keys (missing ones get `CORRECTION_DEFAULTS`): `kind` (`"affine"`
            per-channel `a⊙x + c`, or `"ridge"` full matrix), `sites` (Linear roles whose input is corrected, from
            `CORRECTION_SITES`), `affine_fit` (`"least_squares"` or `"moments"`), `ridge_lambda` (ridge strength,
            relative to the mean input energy), `ridge_fit` (`"residual"`: shrunk towards the identity, with a
            bias; `"direct"`: the library spec's `C = (X_qᵀX_q + λI)⁻¹X_qᵀX_fp`, shrunk towards 0), `fold` (fold
            into the next Linear; default True for affine, False for ridge), `max_tokens` (token rows per site used
            for fitting).
        reconstruction (`dict`): block-wise reconstruction of the weights (I&S-ViT-like); empty = off. Keys (missing
            ones get `RECONSTRUCTION_DEFAULTS`): `iterations` (Adam steps per block), `lr` (cosine-decayed to 0),
            `batch_size` (32 by default; I&S-ViT uses 64 of 1024 images). Only the transformer blocks are
            reconstructed, in one stage (see `calibration/reconstruction.py` for the differences from I&S-ViT).
        format_version (`int`, defaults to `FORMAT_VERSION`), library_version (`str`, defaults to `__version__`),
            quant_method (`str`, defaults to `"optimum_dfq"`): stamps of the checkpoint format, written to
            `config.json`; leave them at their defaults (a `quant_method` of another value is refused, and
            [`~DFQConfig.from_dict`] refuses a newer `format_version`).

    Example:
        >>> cfg = DFQConfig(bits="w4a8", scale_selector="mean")
        >>> DFQConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    bits: str = "w4a4"
    input_bits: int = 8
    input_range: str = "auto"
    weight_observer: str = "percentile_mse"
    weight_symmetric: bool = False
    weight_percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    activation_observer: str = "auto"
    activation_percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    post_layernorm: str = "per_channel_reparam"
    scale_selector: str = "mean"
    round_zero_point: bool = True
    quantize_attention: bool = True
    post_softmax: str = "auto"
    calibration_order: str = "sequential"
    calibration_batch_size: int = 32
    synthesizer: str = "dfq-vit"
    synthesizer_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration_dataset: dict[str, Any] = field(default_factory=dict)
    num_images: int = 32
    seed: int = 0
    modules_to_not_convert: list[str] = field(default_factory=list)
    correction: dict[str, Any] = field(default_factory=dict)
    reconstruction: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    library_version: str = __version__
    quant_method: str = QUANT_METHOD

    _NON_FIELD_KEYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        weight_bits, activation_bits = parse_bits(self.bits)
        self.bits = f"w{weight_bits}a{activation_bits or 16}"  # canonical: " W4A08" is stored as "w4a8"
        self._check_types()
        _check_choice("input_range", self.input_range, INPUT_RANGES)
        _check_choice("weight_observer", self.weight_observer, OBSERVERS)
        _check_choice("activation_observer", self.activation_observer, ACTIVATION_OBSERVERS)
        _check_choice("post_layernorm", self.post_layernorm, POST_LAYERNORM_MODES)
        _check_choice("post_softmax", self.post_softmax, POST_SOFTMAX_QUANTIZERS)
        # Checked against the selector registry when quantizing, not here: a checkpoint made with a custom selector
        # must load in a process that never registered it (the selector's effect is folded into the weights).
        if not isinstance(self.scale_selector, str) or not self.scale_selector:
            raise ConfigError(f"DFQConfig.scale_selector={self.scale_selector!r} must be a selector name, e.g. "
                              f"one of {list(SCALE_SELECTORS)}.")
        _check_choice("calibration_order", self.calibration_order, CALIBRATION_ORDERS)
        if not 2 <= self.input_bits <= 8:
            raise ConfigError(f"DFQConfig.input_bits={self.input_bits} must be in 2..8.")
        for name in ("weight_percentiles", "activation_percentiles"):
            values = getattr(self, name)
            if not values or any(not 0.5 < p <= 1.0 for p in values):
                raise ConfigError(f"DFQConfig.{name}={values!r} must be a non-empty list of values in (0.5, 1].")
        if self.num_images < 1:
            raise ConfigError(f"DFQConfig.num_images={self.num_images} must be at least 1.")
        for pattern in (entry for entry in self.modules_to_not_convert if entry.startswith("re:")):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ConfigError(
                    f"DFQConfig.modules_to_not_convert entry {pattern!r} is not a valid regular expression ({err}); "
                    "escape the special characters (e.g. 're:.*\\.layers\\.0\\..*'), or give the exact module name "
                    "without 're:'."
                ) from None
        if self.calibration_batch_size < 1:
            raise ConfigError(f"DFQConfig.calibration_batch_size={self.calibration_batch_size} must be at least 1.")
        unknown = sorted(set(self.calibration_dataset) - set(CALIBRATION_DATASET_KEYS))
        if unknown or (self.calibration_dataset and "path" not in self.calibration_dataset):
            raise ConfigError(
                f"DFQConfig.calibration_dataset={self.calibration_dataset!r} must be empty or have a 'path' (and "
                "optionally 'split', 'name', 'image_column', 'label_column')."
            )
        for key, value in self.calibration_dataset.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"DFQConfig.calibration_dataset[{key!r}]={value!r} must be a non-empty string (a dataset folder, "
                    "parquet file or Hub id for 'path', a split or configuration name for 'split' and 'name', a "
                    "column name for 'image_column' and 'label_column')."
                )
        if self.quant_method != QUANT_METHOD:
            raise ConfigError(f"DFQConfig.quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}.")
        self.correction = _resolve_correction(self.correction)
        self.reconstruction = _resolve_reconstruction(self.reconstruction)
        # JSON has no tuples: keep the in-memory form equal to what config.json reads back.
        self.synthesizer_kwargs = _plain(self.synthesizer_kwargs)
        self.calibration_dataset = _plain(self.calibration_dataset)

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "str": str, "bool": bool, "float": float}.get(str(f.type))
            if str(f.type).startswith("list"):
                expected = list
            elif str(f.type).startswith("dict"):
                expected = dict
            if expected is None:
                continue
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if not ok:
                raise ConfigError(
                    f"DFQConfig.{f.name} must be of type {f.type}, got {type(value).__name__} {value!r}."
                )
            entry = {"list[str]": str, "list[float]": (int, float)}.get(str(f.type))
            wrong = [item for item in value if not isinstance(item, entry) or isinstance(item, bool)] if entry else []
            if wrong:
                raise ConfigError(
                    f"DFQConfig.{f.name} must be of type {f.type}, but its entry {wrong[0]!r} "
                    f"({type(wrong[0]).__name__}) is not a {'string' if entry is str else 'number'}."
                    f"{_yaml_text_hint(wrong[0])}"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def weight_bits(self) -> int:
        """Bits of the weight quantizers."""
        return parse_bits(self.bits)[0]

    @property
    def activation_bits(self) -> int | None:
        """Bits of the activation quantizers, `None` for weight-only quantization."""
        return parse_bits(self.bits)[1]

    @property
    def activation_range_observer(self) -> str:
        """`activation_observer` with `"auto"` resolved for this config's activation bits."""
        if self.activation_observer != "auto":
            return self.activation_observer
        return "minmax" if (self.activation_bits or 16) >= 8 else "percentile_mse"

    @property
    def post_activation_range_observer(self) -> str:
        """The range estimator of inputs fed by an activation function (fc2's post-GELU input, site S5).

        With `activation_observer="auto"` it is `"percentile_mse"` at every width (**our** choice). At W8A8 the
        post-GELU input is the largest source of logit error on the reference DeiT; keeping percentile-MSE there
        (instead of min/max) lowers DeiT's logit MSE against FP from 4.9e-4 to 4.6e-4 with 32 real images and from
        3.8e-4 to 3.3e-4 with 64, and leaves ViT and Swin within 2% with 32 images (6 calibration draws each,
        `benchmarks/results/w8a8_agreement.md`). An explicit `activation_observer` applies to this site too.
        """
        if self.activation_observer != "auto":
            return self.activation_observer
        return "percentile_mse"

    @property
    def post_softmax_quantizer(self) -> str:
        """`post_softmax` with `"auto"` resolved for this config's activation bits."""
        if self.post_softmax != "auto":
            return self.post_softmax
        bits = self.activation_bits or 16
        return "tanq" if bits >= 8 or bits <= 3 else "log_sqrt2"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict of every field (the form stored in `config.json`)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        """Reads a field like `dict.get` does.

        transformers' loader reads `config.quantization_config` with `.get` (it expects the dict form of
        `config.json`); this lets `from_pretrained(path, config=qmodel.config)` take an in-memory model's config.

        Args:
            key (`str`): a field name, e.g. `"bits"`.
            default (*optional*): returned when `key` is not a field.

        Returns:
            The field's value, or `default`.

        Example:

        ```python
        >>> from optimum_dfq import DFQConfig
        >>> config = DFQConfig(bits="w4a8")
        >>> config.get("bits"), config.get("quant_method"), config.get("load_in_8bit", False)
        ('w4a8', 'optimum_dfq', False)
        ```
        """
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Builds a config from a dict, refusing unknown keys and newer format versions.

        Args:
            config_dict (`dict`): as produced by [`DFQConfig.to_dict`] or read from a recipe.
            return_unused_kwargs (`bool`): transformers' calling convention; extra `kwargs` are returned unused.

        Returns:
            `DFQConfig` (and the unused kwargs when `return_unused_kwargs` is set).

        Raises:
            `CheckpointError`: a newer or malformed `format_version`, or keys or values this release does not know
                in a config written by a newer release (`library_version`).
            `ConfigError`: other unknown keys, or invalid values.
        """
        if not isinstance(config_dict, dict):
            raise ConfigError(f"A DFQConfig must be built from a mapping, got {type(config_dict).__name__}.")
        version = config_dict.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(
                f"This quantization config's format_version={version!r} must be an integer; the config is "
                "malformed (was config.json edited by hand?). Re-save the quantized model."
            )
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"This quantization config has format_version={version!r}, but optimum_dfq {__version__} reads "
                f"format versions up to {FORMAT_VERSION}. Upgrade optimum-dfq (pip install -U optimum-dfq)."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown and _is_newer_release(config_dict.get("library_version")):
            raise CheckpointError(
                f"This quantization config has key(s) {unknown} that optimum_dfq {__version__} does not know: it was "
                f"written by optimum_dfq {config_dict['library_version']}. Upgrade optimum-dfq (pip install -U "
                "optimum-dfq)."
            )
        if unknown:
            raise ConfigError(
                f"Unknown DFQConfig key(s) {with_close_matches(unknown, known)}. Valid keys: {sorted(known)}."
            )
        try:
            config = cls(**config_dict)
        except TypeError as err:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"Invalid DFQConfig: {err}") from err
        except ConfigError as err:  # a newer release's option or value inside a field (e.g. correction)
            if not _is_newer_release(config_dict.get("library_version")):
                raise
            raise CheckpointError(
                f"This quantization config does not validate with optimum_dfq {__version__} ({err}): it was written "
                f"by optimum_dfq {config_dict['library_version']}. Upgrade optimum-dfq (pip install -U optimum-dfq)."
            ) from err
        if return_unused_kwargs:
            return config, kwargs
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> DFQConfig:
        """Reads a YAML recipe: a file, or one of the recipes shipped with the package by name (see
        [`~optimum_dfq.list_recipes`]; they are the repository's `recipes/` folder).

        Args:
            path (`str` or `Path`): the recipe file, or a bundled recipe's name such as `"sardfq_w4a4"`. An existing
                file wins over a bundled recipe of the same name; a `str` that is no file is looked up by name only
                when it has no folder and no `.yaml` suffix; a `Path` is always a file.

        Returns:
            `DFQConfig`

        Raises:
            `ConfigError`: no such file nor bundled recipe (the message lists the bundled names), a folder, invalid
                YAML (a key written twice included), or fields [`DFQConfig.from_dict`] refuses.

        Example:
            >>> DFQConfig.from_yaml("sardfq_w4a4").synthesizer
            'sardfq'
            >>> cfg = DFQConfig.from_yaml("my_recipes/repq_vit_w4a4.yaml")  # doctest: +SKIP
        """
        import yaml

        from .bundled_recipes import read_recipe

        source, text = read_recipe(path)
        try:
            data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass
        except yaml.YAMLError as err:
            raise ConfigError(f"{source[0].upper()}{source[1:]} is not valid YAML: {err}") from err
        if data is None:
            data = {}
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialises the config as YAML; writes it to `path` when given and returns the text."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def replace(self, **changes: Any) -> DFQConfig:
        """Returns a copy with `changes` applied (validated like a new config)."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)

    def with_dataset_columns(self, image_column: str | None = None, label_column: str | None = None) -> DFQConfig:
        """Returns a copy whose `calibration_dataset` also names the columns chosen to read it (the keys it already
        has are kept; a column left `None` is not recorded).

        Args:
            image_column (`str`, *optional*): the dataset's `Image` column.
            label_column (`str`, *optional*): its `ClassLabel` or integer label column.

        Returns:
            `DFQConfig`: `self` when no column is chosen.

        Example:
            >>> config = DFQConfig(calibration_dataset={"path": "pairs/", "split": "train"})
            >>> config.with_dataset_columns(image_column="img").calibration_dataset
            {'path': 'pairs/', 'split': 'train', 'image_column': 'img'}
        """
        chosen = {key: value for key, value in (("image_column", image_column), ("label_column", label_column))
                  if value is not None}
        return self.replace(calibration_dataset={**self.calibration_dataset, **chosen}) if chosen else self


@functools.cache
def _unique_key_loader() -> type:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """A safe loader that refuses a key written twice in one mapping (YAML lets the last one win silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}; keep one of its values", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


_dataclass_init = DFQConfig.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self: DFQConfig, *args: Any, **kwargs: Any) -> None:
    known = [f.name for f in dataclasses.fields(DFQConfig)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        said = with_close_matches(unknown, known)
        raise ConfigError(f"Unknown DFQConfig argument(s) {said}. Valid arguments: {known}.")
    _dataclass_init(self, *args, **kwargs)


DFQConfig.__init__ = _checked_init


def _is_newer_release(version: Any) -> bool:
    """Whether `version` (a config's `library_version`) is a release newer than this one."""
    from packaging.version import InvalidVersion, Version

    try:
        return isinstance(version, str) and Version(version) > Version(__version__)
    except InvalidVersion:
        return False


def _yaml_text_hint(value: Any, integer: bool = False) -> str:
    """The fix for a number that YAML read as text: PyYAML (YAML 1.1) reads `4e-5` without a dot, and `1.0e5` without
    a sign in the exponent, as strings (`integer`: the field takes an integer, spelt out)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    mantissa, _, exponent = value.strip().lower().partition("e")
    if integer and number.is_integer():
        spelling, how = str(int(number)), "no quotes"
    elif exponent:
        sign = "" if exponent[0] in "+-" else "+"
        spelling = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{sign}{exponent}"
        how = "with a dot, a sign after the e and no quotes"
    else:
        spelling, how = value, "no quotes"
    return f" YAML reads {value} as text: write {spelling} ({how}) for a number."


def _fill_defaults(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"Unknown key(s) {with_close_matches(unknown, defaults)} in DFQConfig.{name}. Valid keys: "
                          f"{sorted(defaults)}.")
    resolved = {key: _plain(value) for key, value in defaults.items()}
    resolved.update(_plain(options))
    return resolved


def _check_number(name: str, value: Any, kind: type, minimum: float, strict: bool = False) -> None:
    is_number = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if (not is_number or isinstance(value, bool) or not math.isfinite(value) or value < minimum
            or (strict and value == minimum)):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        what = "a finite number" if kind is float else "an integer"
        raise ConfigError(f"DFQConfig.{name}={value!r} must be {what} {bound}.{_yaml_text_hint(value, kind is int)}")


def _resolve_correction(options: dict[str, Any]) -> dict[str, Any]:
    """Validates `DFQConfig.correction` and fills in defaults (empty stays empty: correction off)."""
    if not options:
        return {}
    resolved = _fill_defaults("correction", options, CORRECTION_DEFAULTS)
    _check_choice("correction['kind']", resolved["kind"], CORRECTION_KINDS)
    _check_choice("correction['affine_fit']", resolved["affine_fit"], AFFINE_FITS)
    _check_choice("correction['ridge_fit']", resolved["ridge_fit"], RIDGE_FITS)
    sites = resolved["sites"]
    if not isinstance(sites, list) or not sites:
        raise ConfigError(
            f"DFQConfig.correction['sites']={sites!r} must be a non-empty list of {list(CORRECTION_SITES)}."
        )
    for site in sites:
        _check_choice("correction['sites'] entry", site, CORRECTION_SITES)
    _check_number("correction['ridge_lambda']", resolved["ridge_lambda"], float, 0.0, strict=True)
    _check_number("correction['max_tokens']", resolved["max_tokens"], int, 1)
    if resolved["fold"] is None:
        resolved["fold"] = resolved["kind"] == "affine"
    if not isinstance(resolved["fold"], bool):
        raise ConfigError(f"DFQConfig.correction['fold']={resolved['fold']!r} must be true or false.")
    return resolved


def _resolve_reconstruction(options: dict[str, Any]) -> dict[str, Any]:
    """Validates `DFQConfig.reconstruction` and fills in defaults (empty stays empty: reconstruction off)."""
    if not options:
        return {}
    resolved = _fill_defaults("reconstruction", options, RECONSTRUCTION_DEFAULTS)
    _check_number("reconstruction['iterations']", resolved["iterations"], int, 1)
    _check_number("reconstruction['lr']", resolved["lr"], float, 0.0, strict=True)
    _check_number("reconstruction['batch_size']", resolved["batch_size"], int, 1)
    return resolved


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
