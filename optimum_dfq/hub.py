"""Hugging Face Hub: model cards for quantized models, and uploads that carry them.

Two ways to push, both uploading the packed weights, `config.json`, the image processor's config (when known) and
the model card built by [`build_model_card`]:

* `qmodel.push_to_hub("org/name")`: transformers' own method. Quantized models (from `quantize()` or
  `from_pretrained`) have their upload step wrapped so that optimum_dfq's card replaces transformers' generic README.
* `DataFreeViTQuantizer.push_to_hub(qmodel, "org/name", eval_results=...)`, i.e. [`push_to_hub`] here, through
  `huggingface_hub.HfApi` (`create_repo` + `upload_folder`), with evaluation results for the card's `model-index`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from .config import DFQConfig
from .errors import ConfigError
from .version import __version__

LIBRARY_NAME = "optimum-dfq"
README = "README.md"
_PROCESSOR_CONFIG = "preprocessor_config.json"


def accuracy_eval_results(
    result: Mapping[str, Any],
    *,
    dataset_id: str,
    dataset_name: str | None = None,
    split: str = "validation",
    dataset_config: str | None = None,
) -> list[EvalResult]:
    """Turns an accuracy result (e.g. from `optimum_dfq.evaluation.evaluate_accuracy`) into card `EvalResult`s.

    Args:
        result (`Mapping[str, Any]`): `{"top1": 0.81, "top5": 0.95, ...}`; keys `top1`/`top5` become metrics.
        dataset_id (`str`): the Hub dataset id, e.g. `"ILSVRC/imagenet-1k"`.
        dataset_name (`str`, *optional*): a readable name (defaults to `dataset_id`).
        split (`str`): the evaluated split.
        dataset_config (`str`, *optional*): the dataset configuration name.

    Returns:
        `list[EvalResult]`

    Example:
        >>> [r.metric_name for r in accuracy_eval_results({"top1": 0.8, "top5": 0.9}, dataset_id="cifar10")]
        ['Top-1 accuracy', 'Top-5 accuracy']
    """
    results = []
    for key, label in (("top1", "Top-1 accuracy"), ("top5", "Top-5 accuracy")):
        if key in result:
            results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_id,
                    dataset_name=dataset_name or dataset_id,
                    dataset_split=split,
                    dataset_config=dataset_config,
                    metric_type="accuracy",
                    metric_name=label,
                    metric_value=float(result[key]),
                )
            )
    if not results:
        raise ConfigError(f"No 'top1'/'top5' accuracy in {dict(result)!r}; nothing to put in the model card.")
    return results


def _config_of(model: nn.Module) -> DFQConfig:
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, DFQConfig):
        raise ConfigError(
            f"{type(model).__name__} is not an optimum_dfq quantized model (its config has no DFQConfig); quantize it "
            "with DataFreeViTQuantizer.quantize or load a quantized checkpoint first."
        )
    return config


def _bits_rows(config: DFQConfig) -> list[tuple[str, str]]:
    symmetry = "symmetric" if config.weight_symmetric else "asymmetric"
    weights = (
        f"{config.weight_bits}-bit integers, per output channel, {symmetry}; "
        f"stored packed ({config.weight_bits} bits per value)"
    )
    rows = [("weights", weights)]
    if config.activation_bits is None:
        rows.append(("activations", "float (weight-only quantization)"))
        return rows
    rows += [
        ("activations", f"{config.activation_bits}-bit, static per-tensor ranges"),
        ("image input", f"{config.input_bits}-bit, " + (
            "levels on the pixel grid of the image processor, per channel" if config.input_range == "pixels"
            else "one calibrated range")),
        ("post-LayerNorm activations", f"`{config.post_layernorm}` (scale selector `{config.scale_selector}`)"),
    ]
    if config.quantize_attention:
        rows.append(
            ("attention",
             f"Q, K, V {config.activation_bits}-bit uniform; softmax output `{config.post_softmax_quantizer}`")
        )
    return rows


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path: it starts with `/`, `.` or `~`, or is no valid Hub id.

    Args:
        name (`str`): a model argument or `name_or_path`.

    Returns:
        `bool`

    Example:
        >>> looks_like_local_path("./models/vit"), looks_like_local_path("a/b/c"), looks_like_local_path("org/vit")
        (True, True, False)
    """
    # not os.altsep: it is "/" on Windows, where every Hub id holds one (a backslash makes no valid Hub id)
    if name.startswith(("/", ".", "~")) or name.endswith(os.sep):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def local_path_or_hub_id(model_or_path: str | os.PathLike) -> str:
    """An existing local path with `~` expanded (transformers does not expand it), else a Hub id; a local-looking
    path (see [`looks_like_local_path`]) with nothing there is refused, naming the path (transformers would call it a
    malformed Hub id).

    Args:
        model_or_path (`str` or `os.PathLike`): a model argument.

    Returns:
        `str`

    Raises:
        `FileNotFoundError`: a local-looking path with nothing there.

    Example:
        >>> local_path_or_hub_id("org/vit")
        'org/vit'
    """
    name = os.fspath(model_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if isinstance(model_or_path, Path) or looks_like_local_path(name):
        raise FileNotFoundError(f"no model folder at {path.absolute()}; check the path, or pass a Hub id such as "
                                "facebook/deit-small-patch16-224.")
    return name


def check_model_folder(model: str | os.PathLike, subfolder: str = "", *, needs_config: bool = True) -> None:
    """Refuses a local model path that is a file, or a folder without `config.json`, naming the fix.

    transformers would read a file as a PyTorch checkpoint (an unpickling error) and say of a folder without
    `config.json` that its config "should have a `model_type` key". Paths that do not exist are left to
    [`local_path_or_hub_id`] (they may be Hub ids).

    Args:
        model (`str` or `os.PathLike`): a model argument.
        subfolder (`str`, *optional*): the `subfolder=` of `from_pretrained`, where `config.json` is looked for.
        needs_config (`bool`, *optional*, defaults to `True`): refuse a folder without `config.json` (`False` when
            the config is passed to `from_pretrained` separately).

    Raises:
        `NotADirectoryError`: the path is a file.
        `FileNotFoundError`: the folder holds no `config.json` and `needs_config` is set.

    Example:
        >>> check_model_folder("org/vit")  # no such local path: a Hub id, nothing to check here
    """
    path = Path(model).expanduser()
    if path.is_file():
        hint = f" (here: {path.parent})" if (path.parent / "config.json").is_file() else ""
        raise NotADirectoryError(
            f"{model} is a file; pass the model folder that holds config.json and the weights instead{hint}."
        )
    if needs_config and path.is_dir() and not (path / subfolder / "config.json").is_file():
        raise FileNotFoundError(
            f"{path / subfolder if subfolder else model} holds no config.json, so it is not a model folder; pass the "
            "folder written by save_pretrained (config.json and the weights)."
        )


def hub_repo_id(name: str | os.PathLike | None) -> str | None:
    """`name` when it is a Hub repository id (`"org/name"`) and not an existing local path, else `None`.

    `quantize()` records the float model's `name_or_path` through this, so a model loaded from a local folder (even a
    relative `"models/vit"`, which looks like a repository id) is never declared as the card's `base_model`.

    Args:
        name (`str` or `os.PathLike`, *optional*): a model's `name_or_path`.

    Returns:
        `str` or `None`

    Example:
        >>> hub_repo_id("google/vit-base-patch16-224"), hub_repo_id("/models/vit"), hub_repo_id("vit")
        ('google/vit-base-patch16-224', None, None)
    """
    if name is None:
        return None
    name = os.fspath(name)
    if "/" in name and not looks_like_local_path(name) and not os.path.exists(name):
        return name
    return None


def _source_processor_config(model: nn.Module) -> Path | None:
    """The `preprocessor_config.json` next to the checkpoint `model` was loaded from, if there is one."""
    source = getattr(getattr(model, "hf_quantizer", None), "source_dir", None)
    path = Path(source) / _PROCESSOR_CONFIG if source else None
    return path if path is not None and path.is_file() else None


def _has_image_processor(model: nn.Module) -> bool:
    """Whether an upload of `model` carries an image processor config (attached by `quantize()`, or found next to
    the checkpoint it was loaded from)."""
    attached = getattr(getattr(model, "hf_quantizer", None), "image_processor", None)
    return attached is not None or _source_processor_config(model) is not None


def _synthetic_intro(synthesizer: str | None) -> str:
    """What the card says about synthetic calibration images, by the kind of synthesizer that made them."""
    from .synthesis import SYNTHESIZERS, GaussianSynthesizer, PixelSynthesizer

    cls = SYNTHESIZERS.get(synthesizer or "")
    if cls is not None and issubclass(cls, PixelSynthesizer):
        return "the calibration images were synthesized from the float model itself."
    if cls is not None and issubclass(cls, GaussianSynthesizer):
        return "the calibration images are Gaussian noise (no image content, not derived from the model)."
    return f"the calibration images were generated by the `{synthesizer}` synthesizer."


def _calibration_text(config: DFQConfig, calibration: Mapping[str, Any]) -> tuple[str, bool, str | None]:
    """A description of the calibration set, whether it was data-free, and the synthesizer's name (if synthetic)."""
    if not calibration:  # no record: the config is all we know
        calibration = {"source": "real" if config.calibration_dataset else "synthetic"}
    count = calibration.get("num_images", config.num_images)
    seed = calibration.get("seed", config.seed)
    source = calibration.get("source")
    if source == "synthetic":
        synthesizer = calibration.get("synthesizer", config.synthesizer)
        hyperparameters = calibration.get("hyperparameters") or config.synthesizer_kwargs
        extra = f" (`{json.dumps(hyperparameters, sort_keys=True)}`)" if hyperparameters else ""
        text = f"data-free: {count} synthetic images from the `{synthesizer}` synthesizer{extra}, seed {seed}"
        return text, True, synthesizer
    if source == "real":
        where = config.calibration_dataset.get("path", "a user-provided dataset") if config.calibration_dataset else (
            "a user-provided dataset")
        return f"**real images**: {count} from {where} (seed {seed}); not data-free", False, None
    return f"{count} user-provided calibration images of unknown origin", False, None


def _recipe_note(config: DFQConfig, calibration: Mapping[str, Any], description: str) -> str:
    """A warning above the recipe when its calibration fields did not make the calibration set.

    `quantize(calibration_dataset=...)` takes images directly (a dataset, a tensor or a saved synthetic set); the
    config then still holds the default synthesis fields, which a reader would take for what was run.
    """
    source = calibration.get("source")
    if not calibration:
        return ""
    if source == "synthetic" and calibration.get("synthesizer", config.synthesizer) == config.synthesizer and (
            calibration.get("seed", config.seed) == config.seed):
        return ""
    if source == "real" and config.calibration_dataset:
        return ""
    return (
        "\nThe calibration images were passed to `quantize()` directly, so this recipe's `synthesizer`, "
        f"`synthesizer_kwargs`, `calibration_dataset` and `seed` did not make them (they were: {description}).\n"
    )


def build_model_card(
    model: nn.Module,
    repo_id: str,
    *,
    base_model: str | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    license: str | None = None,
    image_processor: bool | None = None,
    revision: str | None = None,
) -> ModelCard:
    """The model card of a quantized model: how to load it, the recipe, the bits, the calibration, the results.

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model.
        repo_id (`str`): where it is (or will be) on the Hub; used in the loading snippet.
        base_model (`str`, *optional*): the float model's Hub id (defaults to the one recorded at quantization).
        eval_results (`Sequence[EvalResult]`, *optional*): rendered as the card's `model-index` and a results table
            (defaults to the ones attached to `model.hf_quantizer`).
        license (`str`, *optional*): the licence identifier (e.g. the base model's).
        image_processor (`bool`, *optional*): whether the repository has the image processor's config, so that the
            loading snippet shows `AutoImageProcessor`; defaults to whether one is attached to the model (by
            `quantize()`) or lies next to the checkpoint it was loaded from.
        revision (`str`, *optional*): the branch the model is pushed to; the loading snippet names it unless it is
            `main` or a pull request (`refs/pr/N`, which lands on `main` when merged).

    Returns:
        `huggingface_hub.ModelCard`

    Example:
        >>> card = build_model_card(qmodel, "org/vit-w4a4-dfq")  # doctest: +SKIP
        >>> card.save("README.md")  # doctest: +SKIP
    """
    config = _config_of(model)
    hf_quantizer = getattr(model, "hf_quantizer", None)
    provenance = getattr(hf_quantizer, "provenance", None) or {}
    base_model = base_model or hub_repo_id(provenance.get("base_model"))
    if eval_results is None:
        eval_results = getattr(hf_quantizer, "eval_results", None)
    eval_results = list(eval_results or [])
    architecture = type(model).__name__
    model_name = repo_id.split("/")[-1]
    calibration, data_free, synthesizer = _calibration_text(config, provenance.get("calibration") or {})
    if image_processor is None:
        image_processor = _has_image_processor(model)
    tags = [LIBRARY_NAME, "quantized", *(["data-free"] if data_free else []), config.bits, model.config.model_type]
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        tags=list(dict.fromkeys(tags)),
        model_name=model_name,
        eval_results=eval_results or None,
    )
    origin = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"a `{architecture}`"
    rows = _bits_rows(config) + [
        ("calibration", calibration),
        ("range estimation", (f"`{config.calibration_order}` calibration; activations "
                              f"`{config.activation_range_observer}` (after an activation function "
                              f"`{config.post_activation_range_observer}`), weights `{config.weight_observer}`")),
        ("checkpoint", f"optimum_dfq format v{config.format_version}, written by optimum-dfq {config.library_version}"),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    if eval_results:
        results = "\n".join(
            ["| dataset | split | metric | value |", "|---|---|---|---|"]
            + [
                f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name or r.metric_type} | {r.metric_value} |"
                for r in eval_results
            ]
        )
    else:
        results = "Not evaluated yet."
    intro = (f"**No real image was used**: {_synthetic_intro(synthesizer)}" if data_free
             else f"Calibration: {calibration}.")
    at = f'"{repo_id}"' + (f', revision="{revision}"' if _names_a_branch(revision) else "")
    if image_processor:
        imports = "AutoImageProcessor, AutoModelForImageClassification"
        processor = f'\nprocessor = AutoImageProcessor.from_pretrained({at})'
        processor_note = ""
    else:
        imports, processor = "AutoModelForImageClassification", ""
        processor_note = (
            "\nThis repository has no image processor config: preprocess images as for the float model "
            + (f"([`{base_model}`](https://huggingface.co/{base_model}))" if base_model else "it was quantized from")
            + " (same size and normalisation).\n"
        )
    body = f"""
# {model_name}

{config.bits.upper()} {"data-free " if data_free else ""}quantization of {origin} with
[optimum-dfq](https://pypi.org/project/optimum-dfq/). {intro}

## How to load

```bash
pip install optimum-dfq
```

```python
import optimum_dfq  # required: registers the "optimum_dfq" quantization method with transformers
from transformers import {imports}

model = AutoModelForImageClassification.from_pretrained({at}){processor}
```
{processor_note}
Without `import optimum_dfq`, transformers cannot build this model and raises
`ValueError: Specified attn_implementation="optimum_dfq (requires import optimum_dfq before from_pretrained)" is not
supported`. Do not work around it by passing
`attn_implementation=` to `from_pretrained`: transformers would then load random weights with only a warning.
The model runs fake-quantized in PyTorch (integer codes dequantized on the fly) with eager attention; it
predicts exactly like the quantized model that was saved.

## Quantization

{table}

## Recipe
{_recipe_note(config, provenance.get("calibration") or {}, calibration)}
```yaml
{config.to_yaml().rstrip()}
```

## Evaluation

{results}
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _names_a_branch(revision: str | None) -> bool:
    """Whether a push `revision` is a branch other than `main`, which loading must then name."""
    return revision is not None and revision != "main" and not revision.startswith("refs/pr/")


def write_repo_extras(
    model: nn.Module, folder: str | os.PathLike, repo_id: str, image_processor: Any | None = None, **card_kwargs: Any
) -> None:
    """Writes the image processor's config (when known) and the model card (`README.md`) into `folder`.

    The image processor is `image_processor`, else the one attached to `model.hf_quantizer` by `quantize()`, else
    the `preprocessor_config.json` next to the checkpoint the model was loaded from (copied as is); a
    `preprocessor_config.json` already in `folder` is kept. The card shows `AutoImageProcessor` in its loading
    snippet only when `folder` then holds a processor config.

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model.
        folder (`str` or `os.PathLike`): a folder being uploaded (already holding the saved model).
        repo_id (`str`): the target repository.
        image_processor (*optional*): see above.
        card_kwargs: forwarded to [`build_model_card`].
    """
    folder = Path(folder)
    if image_processor is None:
        image_processor = getattr(getattr(model, "hf_quantizer", None), "image_processor", None)
    if not (folder / _PROCESSOR_CONFIG).exists():
        source = _source_processor_config(model)
        if image_processor is not None:
            image_processor.save_pretrained(folder)
        elif source is not None:
            shutil.copy(source, folder / _PROCESSOR_CONFIG)
    card_kwargs.setdefault("image_processor", (folder / _PROCESSOR_CONFIG).exists())
    build_model_card(model, repo_id, **card_kwargs).save(folder / README)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    image_processor: Any | None = None,
    base_model: str | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
):
    """Uploads a quantized model, its image processor config and its model card to the Hub.

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model.
        repo_id (`str`): `"org/name"`; created if it does not exist.
        image_processor (*optional*): saved next to the model (defaults to the one recorded by `quantize()`).
        base_model, eval_results, license: see [`build_model_card`].
        commit_message, commit_description, private, token, revision, create_pr: as `HfApi.upload_folder` /
            `HfApi.create_repo`; a `revision` naming a branch that does not exist yet is created (from `main`), as
            transformers' `push_to_hub` does.
        max_shard_size (`int` or `str`): as `save_pretrained`.

    Returns:
        `huggingface_hub.CommitInfo`

    Example:
        >>> push_to_hub(qmodel, "org/deit-small-w4a4-dfq", eval_results=results)  # doctest: +SKIP
    """
    _config_of(model)
    api = HfApi(library_name=LIBRARY_NAME, library_version=__version__, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        _create_branch(api, repo_id, revision, create_pr)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        write_repo_extras(model, folder, repo_id, image_processor, base_model=base_model, eval_results=eval_results,
                          license=license, revision=revision)
        config = _config_of(model)
        provenance = getattr(getattr(model, "hf_quantizer", None), "provenance", None) or {}
        _, data_free, _ = _calibration_text(config, provenance.get("calibration") or {})
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {config.bits} {'data-free ' if data_free else ''}quantized model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _create_branch(api: HfApi, repo_id: str, branch: str, create_pr: bool) -> None:
    """Creates `branch` unless it exists; without write access, a pull request may still target an existing one."""
    try:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    except HfHubHTTPError as error:
        if not (create_pr and error.response is not None and error.response.status_code == 403):
            raise
