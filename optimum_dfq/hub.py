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
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
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


def _hub_id(name: str | None) -> str | None:
    """`name` when it looks like a Hub repository id (not a local folder), else `None`."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.isdir(name):
        return name
    return None


def _calibration_text(config: DFQConfig, calibration: Mapping[str, Any]) -> tuple[str, bool]:
    """A description of the calibration set and whether it was data-free."""
    if not calibration:  # no record: the config is all we know
        calibration = {"source": "real" if config.calibration_dataset else "synthetic"}
    count = calibration.get("num_images", config.num_images)
    seed = calibration.get("seed", config.seed)
    source = calibration.get("source")
    if source == "synthetic":
        synthesizer = calibration.get("synthesizer", config.synthesizer)
        hyperparameters = calibration.get("hyperparameters") or config.synthesizer_kwargs
        extra = f" (`{json.dumps(hyperparameters, sort_keys=True)}`)" if hyperparameters else ""
        return f"data-free: {count} synthetic images from the `{synthesizer}` synthesizer{extra}, seed {seed}", True
    if source == "real":
        where = config.calibration_dataset.get("path", "a user-provided dataset") if config.calibration_dataset else (
            "a user-provided dataset")
        return f"**real images**: {count} from {where} (seed {seed}); not data-free", False
    return f"{count} user-provided calibration images of unknown origin", False


def build_model_card(
    model: nn.Module,
    repo_id: str,
    *,
    base_model: str | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of a quantized model: how to load it, the recipe, the bits, the calibration, the results.

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model.
        repo_id (`str`): where it is (or will be) on the Hub; used in the loading snippet.
        base_model (`str`, *optional*): the float model's Hub id (defaults to the one recorded at quantization).
        eval_results (`Sequence[EvalResult]`, *optional*): rendered as the card's `model-index` and a results table
            (defaults to the ones attached to `model.hf_quantizer`).
        license (`str`, *optional*): the licence identifier (e.g. the base model's).

    Returns:
        `huggingface_hub.ModelCard`

    Example:
        >>> card = build_model_card(qmodel, "org/vit-w4a4-dfq")  # doctest: +SKIP
        >>> card.save("README.md")  # doctest: +SKIP
    """
    config = _config_of(model)
    hf_quantizer = getattr(model, "hf_quantizer", None)
    provenance = getattr(hf_quantizer, "provenance", None) or {}
    base_model = base_model or _hub_id(provenance.get("base_model"))
    if eval_results is None:
        eval_results = getattr(hf_quantizer, "eval_results", None)
    eval_results = list(eval_results or [])
    architecture = type(model).__name__
    model_name = repo_id.split("/")[-1]
    calibration, data_free = _calibration_text(config, provenance.get("calibration") or {})
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
    intro = (
        "**No real image was used**: the calibration images were synthesized from the float model itself."
        if data_free else f"Calibration: {calibration}."
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
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo_id}")
processor = AutoImageProcessor.from_pretrained("{repo_id}")
```

Without `import optimum_dfq`, transformers cannot build this model and raises
`ValueError: Specified attn_implementation="optimum_dfq" is not supported`. Do not work around it by passing
`attn_implementation=` to `from_pretrained`: transformers would then load random weights with only a warning.
The model runs fake-quantized in PyTorch (integer codes dequantized on the fly) with eager attention; it
predicts exactly like the quantized model that was saved.

## Quantization

{table}

## Recipe

```yaml
{config.to_yaml().rstrip()}
```

## Evaluation

{results}
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_repo_extras(
    model: nn.Module, folder: str | os.PathLike, repo_id: str, image_processor: Any | None = None, **card_kwargs: Any
) -> None:
    """Writes the model card (`README.md`) and, when known, the image processor's config into `folder`.

    Args:
        model (`PreTrainedModel`): an optimum_dfq quantized model.
        folder (`str` or `os.PathLike`): a folder being uploaded (already holding the saved model).
        repo_id (`str`): the target repository.
        image_processor (*optional*): defaults to the one attached to `model.hf_quantizer` by `quantize()`.
        card_kwargs: forwarded to [`build_model_card`].
    """
    folder = Path(folder)
    build_model_card(model, repo_id, **card_kwargs).save(folder / README)
    if image_processor is None:
        image_processor = getattr(getattr(model, "hf_quantizer", None), "image_processor", None)
    if image_processor is not None and not (folder / _PROCESSOR_CONFIG).exists():
        image_processor.save_pretrained(folder)


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
            `HfApi.create_repo`.
        max_shard_size (`int` or `str`): as `save_pretrained`.

    Returns:
        `huggingface_hub.CommitInfo`

    Example:
        >>> push_to_hub(qmodel, "org/deit-small-w4a4-dfq", eval_results=results)  # doctest: +SKIP
    """
    _config_of(model)
    api = HfApi(library_name=LIBRARY_NAME, library_version=__version__, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        write_repo_extras(
            model, folder, repo_id, image_processor, base_model=base_model, eval_results=eval_results, license=license
        )
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {_config_of(model).bits} data-free quantized model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
