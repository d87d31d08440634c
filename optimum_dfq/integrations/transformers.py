"""transformers integration: `from_pretrained` / `save_pretrained` / `push_to_hub` for optimum_dfq checkpoints.

`import optimum_dfq` registers [`DFQConfig`] as the quantization config and [`DFQHfQuantizer`] as the quantizer of
`quant_method="optimum_dfq"` (idempotently). Then

```python
import optimum_dfq  # required before from_pretrained
from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("org/vit-w4a4-dfq")
```

rebuilds the frozen quantized skeleton on the meta device, lets transformers fill it from the checkpoint, verifies
the load (see [`~formats.checkpoint.verify_loaded`]) and returns a model that predicts bit-identically to the saved
one.

**Quantizing while loading.** Data-free quantization needs nothing but the model, so a float checkpoint can also be
quantized inside `from_pretrained`, as with bitsandbytes or torchao:

```python
qmodel = AutoModelForImageClassification.from_pretrained("facebook/deit-small-patch16-224",
                                                         quantization_config=DFQConfig(bits="w4a4"))
```

transformers loads the float model (in float32: another `dtype` is refused), then [`DFQHfQuantizer`] runs
`DataFreeViTQuantizer(model, image_processor).quantize(config=quantization_config, inplace=True)` on it: the same
synthesis (minutes, with its cache and progress bars), seeds and result as
`DataFreeViTQuantizer.from_pretrained(...).quantize(config=...)`, with the image processor read from the same folder
or Hub revision as the weights. The model returned is the quantized one, with `model.hf_quantizer` attached, so
`save_pretrained` / `push_to_hub` write what they write for a `quantize()` result. The config may also be given as a
dict with `"quant_method": "optimum_dfq"`. A checkpoint that is already quantized keeps its own config (transformers
warns that the one passed is ignored).

**Loading without `import optimum_dfq`.** transformers has no plug-in discovery: it does not know
`quant_method="optimum_dfq"`, only logs `Unknown quantization type, got optimum_dfq ... we will skip the
quantization`, and would load the packed checkpoint as a *randomly initialised float model* (every `weight` missing,
every `weight_packed` unexpected, a warning only). To make that path fail instead, checkpoints also carry
`"attn_implementation": "optimum_dfq (requires import optimum_dfq before from_pretrained)"` in `config.json`
(a second name of the attention quantized models run anyway, so it costs the normal path nothing). Without the import,
transformers stops while building the model, and its error quotes that name, which says what is missing:
`ValueError: Specified attn_implementation="optimum_dfq (requires import optimum_dfq before from_pretrained)" is not
supported. The only possible arguments are ...`. (Checkpoints saved by earlier development versions carry plain
`"optimum_dfq"`, still accepted.)
The one way around it is to pass `attn_implementation=` explicitly to `from_pretrained` without importing
optimum_dfq; transformers then loads random weights with only a "LOAD REPORT" warning: don't.

**A `config.json` that lost its `quantization_config`.** With `import optimum_dfq` the `"optimum_dfq"` attention
is registered, so transformers builds such a checkpoint as a float model with random weights. That model's first
forward raises [`CheckpointError`] naming the missing `quantization_config` (see `optimum_dfq.nn.attention`: the
attention refuses float models that did not opt in with `use_quantized_attention`).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..calibration.convert import QuantizationPlan
from ..config import QUANT_METHOD, DFQConfig
from ..errors import CheckpointError, ConfigError, DFQError
from ..formats.checkpoint import (
    CheckpointInfo,
    build_skeleton,
    check_architecture,
    check_config_family,
    check_quantization_config,
    check_state_dict_argument,
    check_tensor_shapes,
    checkpoint_metadata,
    freeze_model,
    read_checkpoint_info,
    verify_loaded,
)
from ..models import get_adapter
from ..nn.attention import (
    ATTENTION_IMPLEMENTATION,
    ATTENTION_IMPLEMENTATIONS,
    ATTENTION_QUANTIZERS_ATTR,
    SAVED_ATTENTION_IMPLEMENTATION,
    register_attention_implementation,
)
from ..registry import qualified_name, register_unique

logger = logging.getLogger(__name__)

#: Values of `save_pretrained(format=...)`.
NATIVE_FORMAT, COMPRESSED_TENSORS_FORMAT = "optimum_dfq", "compressed-tensors"


class DFQHfQuantizer(HfQuantizer):
    """transformers' side of optimum_dfq checkpoints (registered for `quant_method="optimum_dfq"`).

    It loads quantized checkpoints, and quantizes float ones inside `from_pretrained(...,
    quantization_config=DFQConfig(...))` (`pre_quantized=False`, see [`_process_model_after_weight_loading`]). The
    instance attached to a model as `model.hf_quantizer` also carries what is needed to save it again.

    Args:
        quantization_config (`DFQConfig`): the checkpoint's config, or the run's when quantizing a float model.
        plan (`QuantizationPlan`, *optional*): the structure quantization gave the model (LayerNorm → consuming
            Linears, activation corrections); read from the checkpoint when loading, given by `quantize()` otherwise.
        provenance (`dict`, *optional*): `{"base_model": <float model id>, "calibration": <calibration-set summary>}`
            (saved in the checkpoint, shown in the model card).
        image_processor (*optional*): uploaded with the model by `push_to_hub`.
        eval_results (`list[huggingface_hub.EvalResult]`, *optional*): written into the model card.
    """

    #: transformers refuses `pre_quantized=False` for quantizers that set it; data-free quantization needs no data
    #: from the caller, so it calibrates inside the loading instead
    requires_calibration = False

    def __init__(
        self,
        quantization_config: DFQConfig,
        plan: QuantizationPlan | None = None,
        provenance: dict[str, Any] | None = None,
        image_processor: Any | None = None,
        eval_results: list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(quantization_config, **kwargs)
        self.plan = plan
        self.provenance = dict(provenance or {})
        self.image_processor = image_processor
        self.eval_results = eval_results
        #: folder of the checkpoint files this model was loaded from (its preprocessor_config.json is pushed with it)
        self.source_dir: str | None = None
        self._checkpoint: CheckpointInfo | None = None
        #: the float checkpoint's files, when quantizing inside from_pretrained (they locate its image processor)
        self._float_checkpoint_files: list[str] | None = None
        #: the parameters transformers loaded from the float checkpoint, as it announces each one to its quantizer
        self._float_names_loaded: set[str] = set()

    # ------------------------------------------------------------------ loading
    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """Registers the `"optimum_dfq"` attention, and refuses a `device_map` that offloads modules to disk, or that
        spreads a float model being quantized over several devices.

        transformers calls it with the `device_map` given to `from_pretrained`, then again with the one `"auto"`
        resolved to. Disk-offloaded tensors stay on the meta device until a forward pass, so the load could not be
        verified against the checkpoint ([`verify_loaded`] would call the file incomplete). Synthesis and calibration
        run the float model on one device.

        Raises:
            `ConfigError`: `device_map` puts a module on `"disk"`, or puts the modules of a float model being
                quantized on more than one device.
        """
        register_attention_implementation()
        on_disk = sorted(name or "the whole model" for name, device in device_map.items() if device == "disk") \
            if isinstance(device_map, Mapping) else []
        if on_disk:
            shown = ", ".join(on_disk[:3]) + (f", ... ({len(on_disk) - 3} more)" if len(on_disk) > 3 else "")
            raise ConfigError(
                f"optimum_dfq models cannot be offloaded to disk: device_map puts {shown} on 'disk' "
                "(device_map=\"auto\" does so when max_memory leaves too little room). Loading verifies every tensor "
                "against the checkpoint's digests, and offloaded ones are not loaded. Load the model on one device "
                "(device_map=\"cpu\", or no device_map) or give max_memory more room: packed low-bit weights are small."
            )
        devices = sorted({_device_name(device) for device in device_map.values()}) \
            if isinstance(device_map, Mapping) else []
        if not self.pre_quantized and len(devices) > 1:
            raise ConfigError(
                f"Quantizing inside from_pretrained runs synthesis and calibration on one device, but device_map "
                f"spreads the model over {', '.join(devices)} (device_map=\"auto\" does so when one device has too "
                "little room). Load it on one device (device_map=\"cuda\" or \"cpu\", or no device_map)."
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Keeps the dtype of a quantized checkpoint's load, and refuses any but float32 for a float model to quantize.

        Synthesis and calibration run in float32, and so does the quantized model; `quantize()` would upcast a half
        model, but a float32 checkpoint read in half precision has already lost the bits that upcasting cannot give
        back.

        Raises:
            `ConfigError`: a float model to quantize loaded in another dtype than float32.
        """
        if not self.pre_quantized and dtype != torch.float32:
            raise ConfigError(
                f"from_pretrained(..., quantization_config=DFQConfig(...)) calibrates the float model in float32, but "
                f"it would be loaded as {dtype} (a checkpoint saved in half precision loads so by default, "
                "dtype=\"auto\"). Pass dtype=torch.float32; cast the quantized model afterwards if you wish "
                "(qmodel.half(), or qmodel.to(torch.bfloat16))."
            )
        return dtype

    def update_attn_implementation(self, config):
        if not self.pre_quantized:  # the float model runs its own attention until quantize() switches it
            return config
        check_config_family(config)  # the one hook that sees the config before transformers builds the model
        requested = config._attn_implementation
        if requested not in (None, *ATTENTION_IMPLEMENTATIONS):
            logger.warning(
                "optimum_dfq models run the %r attention implementation (the attention quantizers need the explicit "
                "probabilities); ignoring attn_implementation=%r.", ATTENTION_IMPLEMENTATION, requested
            )
        config._attn_implementation = ATTENTION_IMPLEMENTATION
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any):
        """Reads the checkpoint's headers, checks them against `config.json`, and builds the quantized skeleton.

        Refused with [`CheckpointError`] before any tensor is loaded: a checkpoint of another class
        ([`check_architecture`]), a `config.json` whose `quantization_config` is not the one the weights were saved
        with ([`check_quantization_config`]), and tensors whose shapes do not fit the skeleton
        ([`check_tensor_shapes`]). A float model to quantize is left as it is; an architecture optimum_dfq does not
        quantize is refused ([`UnsupportedArchitectureError`]) before its weights are loaded.
        """
        if not self.pre_quantized:
            get_adapter(model)
            self._float_checkpoint_files = list(checkpoint_files or [])
            _check_float_checkpoint_complete(model, self._float_checkpoint_files, self)
            return model
        info = read_checkpoint_info(checkpoint_files)
        self._checkpoint = info
        self.source_dir = os.path.dirname(os.path.abspath(info.files[0]))
        self.provenance = {**info.provenance, **self.provenance}
        check_architecture(model)
        check_quantization_config(info, self.quantization_config)
        try:
            self.plan = build_skeleton(model, self.quantization_config, info.plan)
        except (AttributeError, KeyError) as err:  # a plan naming modules this architecture does not have
            raise CheckpointError(
                f"The checkpoint's quantization plan does not fit {type(model).__name__}: {err!r}. It was saved from "
                "another architecture; load it with the class named in its config.json."
            ) from err
        check_tensor_shapes(model, info, self)
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        """`False`: transformers loads a float checkpoint's tensors as they are (quantization follows the loading).

        transformers asks this of every tensor it loads into a model being quantized on load, under the model's own
        name, so the answers record which parameters the float checkpoint held; see
        [`~DFQHfQuantizer._process_model_after_weight_loading`].
        """
        if not self.pre_quantized:
            self._float_names_loaded.add(param_name)
        return False

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        """Verifies a quantized checkpoint's load; quantizes a float model in place.

        A float model loaded with `quantization_config=DFQConfig(...)` goes through
        `DataFreeViTQuantizer(model, image_processor).quantize(config=quantization_config, inplace=True)`: the same
        synthesis (or the config's `calibration_dataset`), synthesis cache, seeds, logs and result as
        `DataFreeViTQuantizer.from_pretrained(path).quantize(config=...)`. Its image processor is read from where the
        weights came from (see [`float_checkpoint_processor_location`]). The marks transformers put on the model for
        the quantization config are taken off first, so that the float model (and the synthesis cache key, which
        hashes its config) is the one `DataFreeViTQuantizer.from_pretrained` loads; `quantize()` then attaches its own
        [`DFQHfQuantizer`], which carries the plan and provenance that saving needs.

        Raises:
            `CheckpointError`: the float checkpoint lacked parameters of the model (a backbone-only checkpoint loaded
                into an image classifier), which transformers has initialised at random. Checked before loading for
                safetensors checkpoints; for other formats (`pytorch_model.bin`), whose names cannot be read without
                unpickling, from the tensors transformers announced while loading them.
        """
        if not self.pre_quantized:
            return self._quantize_float_model(model)
        if self._checkpoint is not None:
            verify_loaded(model, self._checkpoint)
            self._checkpoint = None
        attach_quantized_model(model, self)
        return model

    def _quantize_float_model(self, model: nn.Module) -> nn.Module:
        from ..quantizer import DataFreeViTQuantizer, _check_no_missing_weights, load_saved_image_processor

        if self._float_names_loaded:  # empty if transformers announced no tensor: then its load report is the check
            _check_no_missing_weights(model.name_or_path, model, [
                name for name, _ in model.named_parameters() if name not in self._float_names_loaded])
        _remove_loading_marks(model)
        source, location = float_checkpoint_processor_location(model.name_or_path, self._float_checkpoint_files)
        config = self.quantization_config
        logger.info("Quantizing %s to %s inside from_pretrained: synthesis and calibration on %d images (%s) may "
                    "take minutes.", model.name_or_path, config.bits, config.num_images,
                    f"calibration_dataset {config.calibration_dataset.get('path')}" if config.calibration_dataset
                    else f"synthesizer {config.synthesizer!r}")
        if source is None:
            logger.warning("%s was not loaded from a folder or a Hub repository, so it has no image processor; pass "
                           "image_processor= to DataFreeViTQuantizer for real-data calibration.",
                           type(model).__name__)
            image_processor = None
        else:
            image_processor = load_saved_image_processor(source, **location)
        DataFreeViTQuantizer(model, image_processor).quantize(config=config, inplace=True)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        """Shields the attention quantizers' keys from the model's legacy key renamings while loading.

        ViT/DeiT checkpoints are loaded through unanchored regex renamings such as `attention.key -> k_proj`, which
        would also rewrite `attention.dfq_attention.key.scale`. The key segment is swapped for a neutral one before
        the model's renamings and restored after them (saving reverses the list, so the same pair applies).
        """
        from transformers.core_model_loading import WeightRenaming

        conversions = super().update_weight_conversions(weight_conversions, model)
        shielded = f"{ATTENTION_QUANTIZERS_ATTR}."
        placeholder = "optimum_dfq_attn_quantizers."
        return [WeightRenaming(shielded, placeholder), *conversions, WeightRenaming(placeholder, shielded)]

    def _dequantize(self, model: nn.Module, dtype=None):
        """`model.dequantize()` is refused: the packed low-bit weights cannot give back the float model.

        Raises:
            `NotImplementedError`: always, saying to load the float checkpoint instead (the model is left unchanged).
        """
        base_model = self.provenance.get("base_model")
        origin = f" ({base_model!r})" if base_model else ""
        bits = self.quantization_config.weight_bits
        raise NotImplementedError(
            f"optimum_dfq models cannot be dequantized: their weights are stored as {bits}-bit integer codes, and "
            "the float weights they were rounded from (like the LayerNorms and biases that calibration "
            "re-parameterised) cannot be recovered from them. Load the float checkpoint the model was quantized "
            f"from{origin} with from_pretrained instead; the quantized model already runs in float (fake-quantized) "
            "arithmetic."
        )

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model: nn.Module):
        if self.plan is None:
            raise DFQError("This quantizer does not know the model's quantization plan; it cannot write a checkpoint.")
        return None, checkpoint_metadata(model, self.plan, self.provenance, self.quantization_config)

    def is_serializable(self) -> bool:  # a method in transformers 5 (a property in 4.x)
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------------- model attachment
def attach_quantized_model(model: nn.Module, hf_quantizer: DFQHfQuantizer) -> nn.Module:
    """Makes `model` look like a quantized model loaded by `from_pretrained` (also after `quantize()`).

    Sets `model.hf_quantizer`, `is_quantized`, `quantization_method` and `config.quantization_config`; writes
    `attn_implementation=SAVED_ATTENTION_IMPLEMENTATION` into the config (the guard against loading without the
    import, see the module docstring), turning a config's `output_attentions=True` off with a warning (transformers
    saves it only with eager attention; `output_attentions=True` in a forward call still works); and binds methods on
    the instance: `save_pretrained(..., format=...)` (native, or `"compressed-tensors"`; a `state_dict=` other than the
    model's own is refused), the upload step of `push_to_hub`, which replaces transformers' generic README with
    optimum_dfq's model card (see [`~optimum_dfq.hub`]), `half()` and `float()` (transformers refuses them on
    quantized models; here they cast like `.to(torch.float16)` / `.to(torch.float32)`, which gives the model
    `from_pretrained(dtype=...)` loads), and, on the model and its inner `PreTrainedModel`s,
    `set_attn_implementation`, which refuses any attention but `"optimum_dfq"` (the attention quantizers run inside
    it).

    Args:
        model (`PreTrainedModel`): a frozen quantized model.
        hf_quantizer (`DFQHfQuantizer`): its quantizer.

    Returns:
        The same `model`.
    """
    model.hf_quantizer = hf_quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = hf_quantizer.quantization_config
    if model.config.output_attentions:  # transformers refuses to save it with any attention but eager
        logger.warning(
            "The model's config has output_attentions=True, which transformers cannot save with the %r attention "
            "that quantized models run; the quantized model's config sets it to False. Pass output_attentions=True "
            "to its forward call to get the (quantized) attention probabilities.", ATTENTION_IMPLEMENTATION
        )
        model.config.output_attentions = False
    model.config.attn_implementation = SAVED_ATTENTION_IMPLEMENTATION  # serialised into config.json
    # partials of module-level functions (not bound methods) so that deepcopy and pickle keep working
    model.save_pretrained = functools.partial(_save_pretrained, model)
    model._upload_modified_files = functools.partial(_upload_modified_files, model)
    model.half = functools.partial(_cast, model, torch.float16)
    model.float = functools.partial(_cast, model, torch.float32)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation = functools.partial(_set_attn_implementation, module)
    return model


def _device_name(device: int | str | torch.device) -> str:
    """The one name of a `device_map` value, so that `0`, `"cuda"` and `"cuda:0"` count as one device.

    An integer is an index on the current accelerator, as in Accelerate's device maps (CUDA when none is present); a
    device without an index is the current one of its type (index 0 when that type is not present).
    """
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if isinstance(device, int) and not isinstance(device, bool):
        return f"{accelerator.type if accelerator is not None else 'cuda'}:{device}"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # not a torch device ("disk" is refused before): transformers reports it
        return str(device)
    if device.type in ("cpu", "meta") or device.index is not None:
        return str(device)
    on_accelerator = accelerator is not None and accelerator.type == device.type
    return f"{device.type}:{torch.accelerator.current_device_index() if on_accelerator else 0}"


def float_checkpoint_processor_location(
    name_or_path: str | os.PathLike | None, checkpoint_files: list[str] | None
) -> tuple[str | None, dict[str, str]]:
    """Where `DataFreeViTQuantizer.from_pretrained` would read the image processor of a model that transformers
    loaded from `checkpoint_files`: `(model_or_path, AutoImageProcessor.from_pretrained kwargs)`.

    transformers hands quantizers the resolved weight files, not its `revision`, `cache_dir` or `subfolder`
    arguments, so they are read back from the files' location. Files in a local folder: that folder and the
    `subfolder` below it. Files in a Hub cache (`<cache_dir>/models--org--name/snapshots/<commit>/<subfolder>/...`):
    the repository `name_or_path` at that commit (the revision the weights were read at), in that cache, so an
    offline load (`HF_HUB_OFFLINE=1`) reads only cached files. A `token=` given to `from_pretrained` cannot be seen;
    a private repository's processor is read with the default token (`HF_TOKEN`, or `huggingface-cli login`).

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*): what `from_pretrained` was given (`model.name_or_path`).
        checkpoint_files (`list[str]`, *optional*): the weight files transformers resolved.

    Returns:
        `tuple[str | None, dict[str, str]]`: `(None, {})` when the model was not loaded from files (a `state_dict=`).

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> float_checkpoint_processor_location(folder, [os.path.join(folder, "float", "model.safetensors")])[1]
        {'subfolder': 'float'}
        >>> cached = "/cache/models--org--vit/snapshots/" + "a" * 40 + "/model.safetensors"
        >>> float_checkpoint_processor_location("org/vit", [cached])
        ('org/vit', {'revision': 'aaaa...', 'cache_dir': '/cache'})
    """
    from transformers.utils.hub import extract_commit_hash

    if name_or_path is None or not checkpoint_files:
        return None, {}
    name = os.fspath(name_or_path)
    folder = os.path.dirname(os.path.abspath(checkpoint_files[0]))
    local = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(local) and (folder == local or folder.startswith(local + os.sep)):
        subfolder = os.path.relpath(folder, local)
        return name, {"subfolder": subfolder} if subfolder != os.curdir else {}
    commit = extract_commit_hash(checkpoint_files[0], None)
    parts = folder.split(os.sep)
    if commit is None or "snapshots" not in parts:
        return name, {}  # not a Hub cache layout: read as DataFreeViTQuantizer.from_pretrained(name) does
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    location = {"revision": commit, "cache_dir": os.sep.join(parts[:at - 1]) or os.sep}
    subfolder = os.sep.join(parts[at + 2:])
    return name, {**location, "subfolder": subfolder} if subfolder else location


def _check_float_checkpoint_complete(model: nn.Module, files: list[str], hf_quantizer: DFQHfQuantizer) -> None:
    """Refuses, before loading, a float checkpoint that lacks parameters of `model` (typically a backbone-only one
    loaded into an image classifier), as `DataFreeViTQuantizer.from_pretrained` does: transformers would initialise
    them at random, and quantizing such a model gives one that predicts noise. Told from the safetensors headers,
    named as transformers' loading renames them; other formats, or names that cannot be mapped, are checked after
    loading (see [`DFQHfQuantizer._process_model_after_weight_loading`])."""
    from safetensors import SafetensorError, safe_open

    from ..formats.checkpoint import _loading_names
    from ..quantizer import _check_no_missing_weights

    if not files or not all(str(path).endswith(".safetensors") for path in files):
        return
    names: list[str] = []
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                names.extend(handle.keys())
    except (SafetensorError, OSError):
        return  # transformers' loading names the damaged file
    mapping = _loading_names(model, names, hf_quantizer, identity_on_failure=False)
    if mapping is not None:
        loaded = set(mapping.values())
        _check_no_missing_weights(model.name_or_path, model,
                                  [name for name, _ in model.named_parameters() if name not in loaded])


def _remove_loading_marks(model: nn.Module) -> None:
    """Takes off what `from_pretrained` set on a float model for its `quantization_config` (`hf_quantizer`,
    `is_quantized`, `quantization_method`, the configs' `quantization_config` and `_is_quantized`)."""
    for attribute in ("hf_quantizer", "is_quantized", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for attribute in ("quantization_config", "_is_quantized"):
                if hasattr(module.config, attribute):
                    delattr(module.config, attribute)


def finalize_quantized_model(
    model: nn.Module,
    config: DFQConfig,
    plan: QuantizationPlan,
    *,
    base_model: str | None = None,
    calibration: Mapping[str, Any] | None = None,
    image_processor: Any | None = None,
) -> nn.Module:
    """Freezes a freshly calibrated model and attaches its [`DFQHfQuantizer`] (what `quantize()` returns).

    Args:
        model (`PreTrainedModel`): the calibrated quantized model (modified in place).
        config (`DFQConfig`): the run's config.
        plan (`QuantizationPlan`): returned by `quantize_model` (what rebuilds the structure when loading).
        base_model (`str`, *optional*): Hub id or path of the float model; recorded as provenance only when it is a
            Hub id and not an existing local path ([`~optimum_dfq.hub.hub_repo_id`]).
        calibration (`Mapping`, *optional*): the calibration set's metadata (`source`, `synthesizer`, `seed`, ...).
        image_processor (*optional*): the model's image processor (pushed with it).

    Returns:
        The same `model`, frozen: saving it writes packed weights, and it predicts exactly like the reloaded checkpoint.
    """
    from ..hub import hub_repo_id

    freeze_model(model)
    provenance = {"base_model": hub_repo_id(base_model), "calibration": _calibration_summary(calibration or {})}
    hf_quantizer = DFQHfQuantizer(
        config, plan=plan, provenance=provenance, image_processor=image_processor
    )
    return attach_quantized_model(model, hf_quantizer)


def _calibration_summary(metadata: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("source", "synthesizer", "num_images", "seed", "hyperparameters")
    return json.loads(json.dumps({k: metadata[k] for k in keys if k in metadata}, default=str))


def _argument(method: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """The argument `name` of a call of transformers' `method` with `args`/`kwargs`, given by position or keyword
    (`None` when not given, or when the call does not fit the signature: transformers itself then rejects it)."""
    try:
        return inspect.signature(method).bind(*args, **kwargs).arguments.get(name)
    except TypeError:
        return None


def _save_pretrained(self, save_directory: str | os.PathLike, *args: Any, format: str = NATIVE_FORMAT, **kwargs: Any):
    """`save_pretrained` of quantized models; `format="compressed-tensors"` exports for plain transformers."""
    if os.path.isfile(save_directory):  # transformers only logs an error for a file, and saves nothing
        raise ConfigError(
            f"save_pretrained: {os.fspath(save_directory)} is a file, so nothing would be saved; pass a folder (a new "
            "one, or the model's earlier save to replace)."
        )
    state_dict = _argument(type(self).save_pretrained, "state_dict", self, save_directory, *args, **kwargs)
    if state_dict is not None:
        check_state_dict_argument(self, state_dict)
    if format == COMPRESSED_TENSORS_FORMAT:
        from ..formats.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(self, save_directory, *args, **kwargs)
    if format != NATIVE_FORMAT:
        raise ConfigError(
            f"Unknown save format {format!r}; use {NATIVE_FORMAT!r} (default, every quantizer) or "
            f"{COMPRESSED_TENSORS_FORMAT!r} (Linear-only configs, loads without optimum_dfq)."
        )
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def _cast(self, dtype: torch.dtype) -> nn.Module:
    """`half()` / `float()` of quantized models: `self.to(dtype)` (packed codes and flags stay integer)."""
    return self.to(dtype)


def _set_attn_implementation(self, attn_implementation: str | Mapping | None, *args: Any, **kwargs: Any):
    """`set_attn_implementation` of quantized models: only `"optimum_dfq"`, the attention they already run."""
    requested = set(_implementations(attn_implementation))
    if requested - set(ATTENTION_IMPLEMENTATIONS):
        raise ConfigError(
            f"{type(self).__name__} is an optimum_dfq quantized model: it runs the {ATTENTION_IMPLEMENTATION!r} "
            "attention, inside which its Q, K, V and softmax-output quantizers sit. Switching it to "
            f"{attn_implementation!r} would skip them, and the model would no longer predict like the quantized "
            "model. Keep the model's attention implementation; for faster inference, export the model to ONNX "
            "(`optimum_dfq.export.to_onnx`)."
        )
    return type(self).set_attn_implementation(self, attn_implementation, *args, **kwargs)


def _implementations(value: str | Mapping | None) -> list[str | None]:
    """Every implementation named in a `set_attn_implementation` argument (a name, or a nested dict of them)."""
    if isinstance(value, Mapping):
        return [name for item in value.values() for name in _implementations(item)]
    return [value]


def _upload_modified_files(self, working_dir: str | os.PathLike, repo_id: str, *args: Any, **kwargs: Any):
    """transformers' upload step, after writing optimum_dfq's model card over the generic one (whose loading snippet
    names the branch pushed to)."""
    from ..hub import write_repo_extras

    revision = _argument(type(self)._upload_modified_files, "revision", self, working_dir, repo_id, *args, **kwargs)
    write_repo_extras(self, working_dir, repo_id, revision=revision)
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- registration
def _register(mapping: dict, name: str, cls: type, decorator) -> None:
    existing = mapping.get(name)
    if existing is None:
        decorator(name)(cls)
    else:
        register_unique(mapping, name, cls, lambda existing: DFQError(
            f"transformers already has a {name!r} quantization entry from {qualified_name(existing)}; two packages "
            "claim the same quant_method. Uninstall one of them."
        ))


def register_quantization_method() -> None:
    """Registers `quant_method="optimum_dfq"` with transformers (idempotent; `import optimum_dfq` calls it).

    Also registers the `"optimum_dfq"` attention implementation that quantized models run.
    """
    register_attention_implementation()
    _register(AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, DFQConfig, register_quantization_config)
    _register(AUTO_QUANTIZER_MAPPING, QUANT_METHOD, DFQHfQuantizer, register_quantizer)
