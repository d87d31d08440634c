"""Command line: `optimum-dfq {quantize,synthesize,evaluate,export,cache}` and the same group as `optimum-cli dfq ...`.

Imports stay light at module level (only argparse) so that `optimum-cli --help` does not load torch. User errors
(bad preset, missing model, unknown synthesizer, unreadable recipe, ...) print one line and exit with status 2;
anything else is a bug and keeps its traceback.

Multi-GPU synthesis: `accelerate launch --multi_gpu --num_processes 8 -m optimum_dfq.cli quantize ...` (or
`torchrun --nproc_per_node 2 -m optimum_dfq.cli synthesize ...` on CPU). Every process takes part in the sharded
synthesis, on its own device (`PartialState().device`: its GPU); only the main process writes the output and
prints the result line, the others wait for it. `evaluate` and `export` are not sharded: under a launcher they run
on the main process only. `cache list` / `cache delete` / `cache prune` show and reclaim the disk space of the
synthesis cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .cli_cache import add_cache_command

PROG = "optimum-dfq"


BATCH_SIZE_HELP = ("images synthesized together (default: min(32, ceil(num_images / processes)), so that every process "
                   "gets a batch; fix it to make the images independent of the number of processes: another batch "
                   "size gives slightly different images)")
CACHE_DIR_HELP = ("synthesis cache folder, shared by every process (default: $HF_HOME/optimum_dfq/synthesis, or "
                  "$OPTIMUM_DFQ_CACHE/synthesis; a multi-process run checks that every process sees it): a finished "
                  "run with the same arguments is reused, and a run started again after an interruption resumes from "
                  "its finished batches and from the checkpoints of the batches it was optimising (saved every "
                  "checkpoint_every=100 steps and on Ctrl-C)")
NO_CACHE_HELP = "keep no synthesis cache: an interrupted run then starts again from scratch"
CHECKPOINT_EVERY_HELP = ("save the batch being optimised in the synthesis cache every N steps, so that an interrupted "
                         "run resumes it from there (default: the synthesizer's, 100; 0: only on Ctrl-C)")
VERBOSE_HELP = ("log what the run does (INFO, main process only): cache use and, every log_every steps, the synthesis "
                "loss terms")


def _bundled_recipe_names() -> str:
    from .bundled_recipes import list_recipes
    from .errors import ConfigError

    try:
        return ", ".join(list_recipes())
    except ConfigError:  # optimum_dfq imported from a source tree that is not installed: --recipe still takes paths
        return "none installed"


def _add_quantize(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a ViT/DeiT/Swin image classifier data-free and save it",
        description="Quantize MODEL (Hub id or local folder) on calibration images synthesized from it (or on "
        "--calibration-dataset) and save it to OUTPUT_DIR with save_pretrained (packed weights, quantization config, "
        "image processor). A flag given with --recipe replaces the recipe's field of the same name.",
    )
    parser.add_argument("model", help="float model: Hub id (e.g. facebook/deit-small-patch16-224) or local folder")
    _add_revision_flag(parser)
    parser.add_argument("output_dir", help="where to save the quantized model: a new or empty folder")
    parser.add_argument("--bits", default=None, help="bit preset: w8a8, w6a6, w4a8, w4a4, w3a4, w3a3, w8a16, w4a16 "
                        "(default: the recipe's, else w4a4)")
    parser.add_argument("--synthesizer", default=None, help="calibration-image synthesizer (default: the recipe's, "
                        "else the library default)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="number of calibration images (default: the recipe's, else 32)")
    parser.add_argument("--recipe", default=None, help="YAML recipe (DFQConfig fields): the name of one shipped with "
                        f"the package ({_bundled_recipe_names()}) or a file path; an existing file wins over a name")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of synthesis and calibration (default: the recipe's, else 0)")
    parser.add_argument("--calibration-dataset", default=None,
                        help="calibrate on these images instead of synthesizing: REAL images (parquet file, dataset "
                        "folder or Hub id; replaces a recipe's calibration_dataset) or a folder written by "
                        "`synthesize` (used whole)")
    parser.add_argument("--calibration-split", default=None,
                        help="split of --calibration-dataset (default: the split a one-split saved folder holds, "
                        "else train)")
    parser.add_argument("--image-column", default=None, metavar="NAME",
                        help="Image column of the calibration dataset (needed when it has several; recorded in the "
                        "saved config)")
    parser.add_argument("--label-column", default=None, metavar="NAME",
                        help="ClassLabel or integer column of the calibration dataset's labels (with several "
                        "ClassLabel columns none is read without it; calibration does not use them)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push the result to this Hub repo")
    parser.add_argument("--private", action="store_true",
                        help="with --push-to-hub: create the Hub repo private (an existing repo keeps its visibility)")
    parser.add_argument("--batch-size", type=int, default=None, help=BATCH_SIZE_HELP)
    _add_cache_flags(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.set_defaults(handler=run_quantize)


def _add_cache_flags(parser: argparse.ArgumentParser) -> None:
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    cache.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help=CHECKPOINT_EVERY_HELP)


def _cache_argument(args: argparse.Namespace) -> str | bool | None:
    """`cache_dir=` for the library: the folder, `False` for --no-cache, `None` for the default cache."""
    return False if args.no_cache else args.cache_dir


def _cache_flag(args: argparse.Namespace) -> str | None:
    """The cache flag the user gave, if any (for messages refusing it)."""
    return "--no-cache" if args.no_cache else "--cache-dir" if args.cache_dir is not None else None


def _add_synthesize(subparsers) -> None:
    parser = subparsers.add_parser(
        "synthesize",
        help="synthesize a calibration set for a model and save it (plus a PNG grid)",
        description="Synthesize NUM_IMAGES calibration images from MODEL and save them as a `datasets` dataset in "
        "OUTPUT_DIR, with a PNG grid of the de-normalised images for a visual check.",
    )
    parser.add_argument("model", help="float model: Hub id or local folder")
    _add_revision_flag(parser)
    parser.add_argument("output_dir", help="where to save the calibration set: a new or empty folder")
    parser.add_argument("--synthesizer", default=None, help="synthesizer name: dfq-vit, sardfq, psaq, gaussian "
                        "(default: the library default, DFQConfig().synthesizer)")
    parser.add_argument("--num-images", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, help=BATCH_SIZE_HELP)
    parser.add_argument("--iterations", type=int, default=None,
                        help="total optimisation steps, split over the synthesizer's phases (the first phases get "
                        "one more step when the total does not divide evenly, e.g. 5 -> 3 + 2; default: the paper's, "
                        "e.g. 2 x 500 for psaq)")
    _add_cache_flags(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.set_defaults(handler=run_synthesize)


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 accuracy of a (quantized) model on a labelled image dataset",
        description="Evaluate MODEL (float or quantized) on a labelled image dataset; prints top-1/top-5 and, with "
        "--output, writes them as JSON.",
    )
    parser.add_argument("model", help="model folder or Hub id (quantized optimum_dfq checkpoints load too)")
    _add_revision_flag(parser)
    parser.add_argument("--dataset", required=True, help="parquet file, dataset folder or Hub id")
    parser.add_argument("--split", default=None,
                        help="dataset split (default: the split a one-split saved folder holds, else test)")
    parser.add_argument("--image-column", default=None, metavar="NAME",
                        help="the dataset's Image column (needed when it has several)")
    parser.add_argument("--label-column", default=None, metavar="NAME",
                        help="column of class ids to score (default: the ClassLabel column, of several the one with "
                        "the model's class names, else 'label' or 'labels')")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--output", default=None, help="JSON file for the results (default: print only; its folder "
                        "is created)")
    parser.add_argument("--no-class-name-check", dest="check_class_names", action="store_false",
                        help="score a dataset whose ClassLabel names differ from the model's id2label (spelling only)")
    parser.set_defaults(handler=run_evaluate)


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a quantized model to ONNX (QDQ activations, integer weights) and report what runs in integer",
        description="Export the quantized model MODEL_DIR to OUTPUT (.onnx) for ONNX Runtime: uniform quantizers "
        "become QuantizeLinear/DequantizeLinear, Linear weights integer constants (or 4-bit MatMulNBits), the rest "
        "float ops. Prints the export report and writes it next to OUTPUT as JSON.",
    )
    parser.add_argument("model", help="a quantized optimum_dfq checkpoint (folder or Hub id)")
    _add_revision_flag(parser)
    parser.add_argument("output", help="the .onnx file to write (an existing one is replaced)")
    parser.add_argument("--no-int4-weights", action="store_true",
                        help="store <=4-bit weights in 8-bit containers (integer matmul) instead of MatMulNBits")
    parser.add_argument("--block-size", type=int, default=128, help="MatMulNBits block size (power of two >= 16)")
    parser.add_argument("--signed-weights", action="store_true",
                        help="8-bit weight codes as int8 for faster kernels; exact only on CPUs with VNNI (or ARM)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset of the default domain (at least 13)")
    parser.set_defaults(handler=run_export)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Adds the `quantize`, `synthesize`, `evaluate`, `export` and `cache` sub-commands to `parser`."""
    subparsers = parser.add_subparsers(title="commands", dest="dfq_command", metavar="COMMAND")
    _add_quantize(subparsers)
    _add_synthesize(subparsers)
    _add_evaluate(subparsers)
    _add_export(subparsers)
    add_cache_command(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Data-free low-bit quantization of Hugging Face vision transformers (ViT, DeiT, Swin).",
    )
    add_commands(parser)
    return parser


# ---------------------------------------------------------------------------------------------- handlers
def _add_revision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="revision of a Hub MODEL: branch, tag or commit hash (default: main)")


def _resolve_model(model: str, revision: str | None = None) -> str:
    """Checks the MODEL argument before anything is loaded and returns what to pass to `from_pretrained`.

    An existing folder is returned (with `~` expanded) and must hold a `config.json`; a path that exists but is a file,
    or a local-looking path (`/...`, `./...`, `~/...`, `a/b/c`) that does not exist, is refused with the fix. Anything
    else is a Hub id (`"org/name"`) and is returned unchanged.

    Args:
        model (`str`): the MODEL argument.
        revision (`str`, *optional*): the `--revision` flag, which only a Hub id can take.

    Returns:
        `str`: a local folder or a Hub id.

    Raises:
        `FileNotFoundError`: no folder at a local-looking path, or a folder without `config.json`.
        `NotADirectoryError`: the path is a file.
        `ValueError`: `revision` given with a local folder (a folder has one version: the files in it).
    """
    from .hub import check_model_folder, local_path_or_hub_id

    check_model_folder(model)
    source = local_path_or_hub_id(model)
    if revision is not None and Path(source).is_dir():
        raise ValueError(f"--revision {revision} selects a version of a Hub model, but {model} is a local folder; "
                         "drop --revision, or pass the Hub id.")
    return source


def _check_output_dir(output_dir: str) -> None:
    """Refuses an OUTPUT_DIR that is a file or a folder with files in it, before anything is loaded.

    Writing into such a folder would replace its files (the float model itself, when OUTPUT_DIR is MODEL, or an
    earlier calibration set) or leave them mixed with the new ones. A new or empty folder is accepted.

    Args:
        output_dir (`str`): the OUTPUT_DIR argument.

    Raises:
        `DFQError`: the path is a file, or a folder that is not empty.
    """
    from .errors import DFQError

    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise DFQError(f"{output_dir} is a file, not a folder; pass a new or empty folder as the output.")
    names = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DFQError(f"{output_dir} already holds {shown}; nothing is overwritten: pass a new or empty folder, or "
                       "delete this one first.")


def _load_quantizer(model: str, image_processor: bool = True, revision: str | None = None):
    """The quantizer of MODEL (a local folder or a Hub id at `revision`; see [`_resolve_model`] for the checks), with
    its image processor unless `image_processor=False`."""
    from .quantizer import DataFreeViTQuantizer

    source = _resolve_model(model, revision)
    hub_options = {} if revision is None else {"revision": revision}
    try:
        return DataFreeViTQuantizer.from_pretrained(source, load_image_processor=image_processor, **hub_options)
    except OSError as err:
        if Path(source).is_dir():
            raise
        # A Hub id that did not load: say that no local folder of that name exists either (a mistyped local path
        # such as `models/vit` is also a valid Hub id).
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"no local folder {model} in {Path.cwd()}, and as a Hub id it did not load: {reason}") from err


def _require_image_processor(quantizer, model: str, needed_by: str) -> None:
    """Refuses a MODEL loaded without an image processor when the command needs one, with a fix a command-line user
    can apply (the library's own messages name `image_processor=` arguments the commands do not have)."""
    from .errors import DFQError

    if quantizer.image_processor is None:
        raise DFQError(
            f"{model} has no image processor (no preprocessor_config.json), which {needed_by} needs. Save the float "
            f"model's one there: AutoImageProcessor.from_pretrained(<float model>).save_pretrained({model!r}) (or copy "
            "its preprocessor_config.json)."
        )


def _is_saved_calibration_set(path: str | None) -> bool:
    """Whether `path` is a folder written by `synthesize` (or `save_calibration_set`): pixel values already
    preprocessed, so calibrating on it needs no image processor."""
    if not path:
        return False
    try:
        info = json.loads((Path(path) / "dataset_info.json").read_text(encoding="utf-8"))
        return "pixel_values" in info.get("features", {})
    except (OSError, ValueError, AttributeError):
        return False


def _process_state():
    """The accelerate process state (one process unless started by `torchrun` / `accelerate launch`).

    It is the state the synthesizers shard with (`PartialState(cpu=<no CUDA>)`), so the CLI and the synthesis agree
    on which process is the main one. Progress bars and warnings are shown by the main process only: the others
    load the same model and (with `quantize`) repeat the same calibration, so they would repeat them once per
    process. Errors are still reported by every process.
    """
    from .synthesis.distributed import resolve_state

    state = resolve_state()
    if not state.is_main_process:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the calibration bars follow it too
        transformers_logging.set_verbosity_error()
        logging.getLogger("optimum_dfq").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    return state


def _check_synthesizer_name(name: str) -> None:
    """Refuses an unregistered synthesizer name with the registry's message (before any model is loaded)."""
    from .synthesis import SYNTHESIZERS, get_synthesizer

    if name not in SYNTHESIZERS:
        get_synthesizer(name)  # raises SynthesisError("Unknown synthesizer ... Available: [...]")


def split_iterations(total: int, phases: int) -> list[int]:
    """Splits `total` optimisation steps over `phases` phases, the first phases taking one more step if needed.

    Args:
        total (`int`): the `--iterations` total, at least `phases`.
        phases (`int`): the number of phases of the synthesizer.

    Returns:
        `list[int]`: steps per phase, summing to `total`.

    Example:
        >>> split_iterations(5, 2)
        [3, 2]
        >>> split_iterations(1000, 2)
        [500, 500]
    """
    base, extra = divmod(total, phases)
    return [base + (phase < extra) for phase in range(phases)]


def _build_synthesizer(name: str | None, iterations: int | None, checkpoint_every: int | None = None):
    """The synthesizer of `synthesize` (library default name if `None`), with `iterations` total steps and
    `checkpoint_every` if given."""
    from .synthesis import get_synthesizer

    if name is None:
        from .config import DFQConfig

        name = DFQConfig().synthesizer
    _check_synthesizer_name(name)
    synthesizer = get_synthesizer(name)
    if checkpoint_every is not None:
        _check_checkpoint_every(synthesizer, checkpoint_every)
        synthesizer = get_synthesizer(name, checkpoint_every=checkpoint_every)
    if iterations is None:
        return synthesizer
    phases = len(getattr(synthesizer, "iterations", ()))
    if not phases:
        raise ValueError(f"Synthesizer '{name}' does not optimise images; drop --iterations.")
    if iterations < phases:
        raise ValueError(f"--iterations must be at least {phases} (one per phase) for '{name}', got {iterations}.")
    steps = split_iterations(iterations, phases)
    extra = {} if checkpoint_every is None else {"checkpoint_every": checkpoint_every}
    return get_synthesizer(name, iterations=steps, warmup=min(synthesizer.warmup, max(1, min(steps) // 5)), **extra)


def _check_batch_size(synthesizer, batch_size: int) -> None:
    """Refuses `--batch-size` for a synthesizer that does not optimise images in batches, or below 1."""
    from .errors import DFQError

    if not synthesizer.accepts("batch_size"):
        raise DFQError(f"Synthesizer '{synthesizer.name}' does not optimise images in batches; drop --batch-size.")
    if batch_size < 1:
        raise DFQError(f"--batch-size must be at least 1, got {batch_size}.")


def _check_checkpoint_every(synthesizer, checkpoint_every: int) -> None:
    """Refuses `--checkpoint-every` below 0 or for a synthesizer that does not optimise images."""
    from .errors import DFQError

    if not hasattr(synthesizer, "checkpoint_every"):
        raise DFQError(f"Synthesizer '{synthesizer.name}' does not optimise images, so it has nothing to checkpoint; "
                       "drop --checkpoint-every.")
    if checkpoint_every < 0:
        raise DFQError(f"--checkpoint-every must be a number of steps >= 0 (0: only on Ctrl-C), got "
                       f"{checkpoint_every}.")


def _check_cache_flags(synthesizer, args: argparse.Namespace) -> None:
    """Refuses `--cache-dir`/`--no-cache` for a synthesizer that keeps no cache (one that does not optimise images)."""
    from .errors import DFQError

    flag = _cache_flag(args)
    if flag is not None and not synthesizer.accepts("cache_dir"):
        raise DFQError(f"Synthesizer '{synthesizer.name}' has no cache; drop {flag}.")


def _check_checkpoints_are_kept(args: argparse.Namespace) -> None:
    """Refuses `--checkpoint-every` when no synthesis cache, where checkpoints are kept, is used."""
    from .errors import DFQError
    from .synthesis.cache import DISABLE_CACHE_ENV, resolve_cache_dir

    if args.no_cache:
        raise DFQError("--checkpoint-every saves checkpoints in the synthesis cache, which --no-cache turns off; drop "
                       "one of them.")
    if resolve_cache_dir(args.cache_dir) is None:
        raise DFQError(f"--checkpoint-every saves checkpoints in the synthesis cache, which {DISABLE_CACHE_ENV} turns "
                       "off; add --cache-dir DIR, or unset it.")


def _check_real_data_flags(args: argparse.Namespace, config) -> None:
    """Refuses the synthesis flags of `quantize` when its images come from a dataset, which they would not affect."""
    from .errors import DFQError

    given = "--calibration-dataset" if args.calibration_dataset else "the recipe's calibration_dataset"
    where = f"{given} ({config.calibration_dataset['path']})"
    if args.synthesizer is not None:
        raise DFQError(f"--synthesizer {args.synthesizer} would not be used: the images come from {where}. Drop "
                       f"--synthesizer to calibrate on them, or drop {given} to synthesize.")
    if args.batch_size is not None:
        raise DFQError(f"--batch-size sets the synthesis batch size, but this run calibrates on real images; "
                       f"drop --batch-size. The images come from {where}.")
    for flag, value in ((_cache_flag(args), True), ("--checkpoint-every", args.checkpoint_every)):
        if flag is not None and value is not None:
            raise DFQError(f"{flag} is for synthesized images, but this run calibrates on real images; drop {flag}. "
                           f"The images come from {where}.")


def _with_column_flags(args: argparse.Namespace, config):
    """The config whose `calibration_dataset` records `--image-column` / `--label-column`, refused (before the model
    is loaded) when no image dataset is read: the images are synthesized, or come from a `synthesize` folder."""
    from .errors import DFQError

    chosen = [(flag, value) for flag, value in (("--image-column", args.image_column),
                                                ("--label-column", args.label_column)) if value is not None]
    if not chosen:
        return config
    flags = " and ".join(f"{flag} {value}" for flag, value in chosen)
    if not config.calibration_dataset:
        raise DFQError(f"{flags} would not be used: this run synthesizes its calibration images. Drop it, or add "
                       "--calibration-dataset with the image dataset it is a column of.")
    if _is_saved_calibration_set(config.calibration_dataset["path"]):
        raise DFQError(f"{flags} would not be used: {config.calibration_dataset['path']} is a calibration set written "
                       "by `synthesize` (preprocessed pixel values, no image column). Drop it.")
    return config.with_dataset_columns(args.image_column, args.label_column)


def _check_run_synthesizer(config, args: argparse.Namespace):
    """Builds the synthesizer `quantize` will run (the recipe's, or `--synthesizer`, with the recipe's
    `synthesizer_kwargs`), so that hyper-parameters it does not take are refused before the model is loaded."""
    from .errors import SynthesisError
    from .synthesis import synthesizer_from_config

    flags = {"bits": args.bits, "synthesizer": args.synthesizer, "num_images": args.num_images, "seed": args.seed}
    run = config.replace(**{name: value for name, value in flags.items() if value is not None})
    try:
        return synthesizer_from_config(run)
    except SynthesisError as err:
        if run.synthesizer == config.synthesizer or not config.synthesizer_kwargs:
            raise
        raise SynthesisError(
            f"--synthesizer {run.synthesizer} replaces the recipe's synthesizer, but the recipe's synthesizer_kwargs "
            f"{config.synthesizer_kwargs} are for '{config.synthesizer}' ({err}). Drop --synthesizer, or use a recipe "
            "without synthesizer_kwargs."
        ) from err


def _calibration_source(qmodel) -> str:
    """Where the calibration images of a quantized model came from, for the result line of `quantize`.

    Read from the calibration set's provenance, not from the config: a folder written by `synthesize` and passed as
    `--calibration-dataset` holds synthetic images, while the config's `synthesizer` field is then unused.
    """
    config = qmodel.config.quantization_config
    calibration = qmodel.hf_quantizer.provenance.get("calibration", {})
    where = config.calibration_dataset.get("path")
    if calibration.get("source") == "synthetic":
        synthesizer = f"'{calibration.get('synthesizer', config.synthesizer)}'"
        return f"{synthesizer} (saved set {where})" if where else synthesizer
    return f"real images ({where})" if where else "real images"


def run_quantize(args: argparse.Namespace) -> int:
    from .calibration.data import load_image_dataset, split_to_load
    from .config import DFQConfig, parse_bits

    # Everything that can be checked without the model is checked before it is loaded (or downloaded).
    config = DFQConfig.from_yaml(args.recipe) if args.recipe else DFQConfig()
    if args.bits is not None:
        parse_bits(args.bits)
    if args.synthesizer is not None:
        _check_synthesizer_name(args.synthesizer)
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}.")
    if args.private and not args.push_to_hub:
        raise ValueError("--private applies to the Hub repo that --push-to-hub REPO creates; add --push-to-hub, or "
                         "drop --private.")
    if args.calibration_dataset:  # replaces the recipe's dataset: the saved config names the images really used
        args.calibration_split = split_to_load(args.calibration_dataset, args.calibration_split, "train")
        config = config.replace(calibration_dataset={"path": args.calibration_dataset,
                                                     "split": args.calibration_split})
    config = _with_column_flags(args, config)
    if config.calibration_dataset:
        _check_real_data_flags(args, config)
        needs_processor = "calibrating on real images"
    else:
        synthesizer = _check_run_synthesizer(config, args)
        needs_processor = f"the synthesizer '{synthesizer.name}'" if synthesizer.accepts("image_mean") else None
        if args.batch_size is not None:
            _check_batch_size(synthesizer, args.batch_size)
            config = config.replace(synthesizer_kwargs={**config.synthesizer_kwargs, "batch_size": args.batch_size})
        _check_cache_flags(synthesizer, args)
        if args.checkpoint_every is not None:
            _check_checkpoint_every(synthesizer, args.checkpoint_every)
            _check_checkpoints_are_kept(args)
            config = config.replace(synthesizer_kwargs={**config.synthesizer_kwargs,
                                                        "checkpoint_every": args.checkpoint_every})
    _resolve_model(args.model, args.revision)
    _check_output_dir(args.output_dir)

    # Under a launcher every process runs the same quantize() call, so each takes part in the sharded synthesis
    # (which gathers the whole set on every process); the calibration that follows is deterministic and short
    # next to synthesis, so the other processes repeat it rather than wait in a barrier that a long calibration
    # (block reconstruction) could time out. Only the main process saves, pushes and prints.
    state = _process_state()
    with state.main_process_first():  # one Hub download / dataset cache write, then the others read it
        quantizer = _load_quantizer(args.model, revision=args.revision)
        if needs_processor and not _is_saved_calibration_set(config.calibration_dataset.get("path")):
            _require_image_processor(quantizer, args.model, needs_processor)
        dataset = None
        if args.calibration_dataset:
            dataset = load_image_dataset(args.calibration_dataset, args.calibration_split)
    qmodel = quantizer.quantize(bits=args.bits, config=config, synthesizer=args.synthesizer,
                                num_images=args.num_images, seed=args.seed, calibration_dataset=dataset,
                                cache_dir=_cache_argument(args), synthesis_device=state.device,
                                save_dir=args.output_dir if state.is_main_process else None,
                                image_column=args.image_column, label_column=args.label_column)
    # The others wait only for the save: an upload can outlast the process group's timeout, and needs no other process
    state.wait_for_everyone()
    if state.is_main_process:
        final = qmodel.config.quantization_config
        print(f"quantized {args.model} to {final.bits} with {final.num_images} calibration images from "
              f"{_calibration_source(qmodel)}; saved to {args.output_dir}")
        if args.push_to_hub:
            qmodel.push_to_hub(args.push_to_hub, private=True if args.private else None)
            print(f"pushed to {args.push_to_hub}")
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    from .synthesis.dataset import save_calibration_set
    from .synthesis.visualize import save_image_grid

    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}.")
    synthesizer = _build_synthesizer(args.synthesizer, args.iterations, args.checkpoint_every)
    if args.checkpoint_every is not None:
        _check_checkpoints_are_kept(args)
    if args.batch_size is not None:
        _check_batch_size(synthesizer, args.batch_size)
    _check_cache_flags(synthesizer, args)
    _resolve_model(args.model, args.revision)
    _check_output_dir(args.output_dir)

    state = _process_state()
    with state.main_process_first():
        quantizer = _load_quantizer(args.model, revision=args.revision)
    if synthesizer.accepts("image_mean"):  # the synthesizers that optimise pixels clamp them to the processor's range
        _require_image_processor(quantizer, args.model, f"the synthesizer '{synthesizer.name}'")
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    if synthesizer.accepts("cache_dir"):
        extra["cache_dir"] = _cache_argument(args)
    if synthesizer.accepts("device"):  # this process's GPU under a launcher (from_pretrained leaves the model on CPU)
        extra["device"] = state.device
    optimised: list[int] = []  # images this process optimised; the others came from the synthesis cache
    if synthesizer.accepts("on_batch_end"):
        extra["on_batch_end"] = lambda record: optimised.append(record.stop - record.start)
    calibration = synthesizer.synthesize(quantizer.model, args.num_images, seed=args.seed,
                                         image_processor=quantizer.image_processor, **extra)
    if "on_batch_end" in extra:
        from .synthesis.distributed import gather_lists

        optimised = gather_lists(state, optimised)
    if state.is_main_process:
        output = Path(args.output_dir)
        save_calibration_set(calibration, output)
        processor = quantizer.image_processor
        grid = output / "grid.png"
        save_image_grid(calibration, grid, mean=getattr(processor, "image_mean", None),
                        std=getattr(processor, "image_std", None))
        steps = getattr(synthesizer, "iterations", ())
        schedule = f" ({sum(steps)} steps: {' + '.join(map(str, steps))})" if steps else ""
        made = f"{len(calibration)} images with '{synthesizer.name}'{schedule}"
        print(f"{_synthesis_outcome(made, len(calibration), sum(optimised), 'on_batch_end' in extra)}; saved to "
              f"{output} (preview: {grid})")
    state.wait_for_everyone()
    return 0


def _synthesis_outcome(made: str, num_images: int, optimised: int, counted: bool) -> str:
    """How the images of a `synthesize` run came to be: optimised now, loaded from the synthesis cache, or both."""
    if not counted or optimised == num_images:
        return f"synthesized {made}"
    if optimised == 0:
        return f"loaded {made} from the synthesis cache (no step run)"
    return f"synthesized {made}, {num_images - optimised} of them resumed from the synthesis cache"


def run_evaluate(args: argparse.Namespace) -> int:
    from .calibration.data import load_image_dataset, split_to_load
    from .errors import DFQError
    from .evaluation import evaluate_accuracy

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise DFQError(f"{flag} must be at least 1, got {value}.")
    if args.output and Path(args.output).is_dir():
        raise DFQError(f"--output {args.output} is a folder; pass the JSON file to write, e.g. "
                       f"{Path(args.output) / 'results.json'}.")
    if not _process_state().is_main_process:
        return 0  # evaluation is not sharded: under a launcher the main process evaluates, the others stop here
    quantizer = _load_quantizer(args.model, revision=args.revision)
    _require_image_processor(quantizer, args.model, "evaluate (to preprocess the dataset's images)")
    args.split = split_to_load(args.dataset, args.split, "test")
    dataset = load_image_dataset(args.dataset, args.split)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    results = evaluate_accuracy(quantizer.model, dataset, quantizer.image_processor, batch_size=args.batch_size,
                                check_class_names=args.check_class_names, image_column=args.image_column,
                                label_column=args.label_column)
    results.update({"model": args.model, "dataset": args.dataset, "split": args.split})
    results.update({key: value for key, value in (("image_column", args.image_column),
                                                  ("label_column", args.label_column)) if value is not None})
    line = f"top-1 {100 * results['top1']:.2f}%"
    if "top5" in results:
        line += f"  top-5 {100 * results['top5']:.2f}%"
    print(f"{line}  ({results['num_examples']} examples of {args.dataset}:{args.split})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .errors import DFQError
    from .export import to_onnx

    if Path(args.output).is_dir():
        raise DFQError(f"{args.output} is a folder; pass the .onnx file to write, e.g. "
                       f"{Path(args.output) / 'model.onnx'}.")
    if not _process_state().is_main_process:
        return 0  # the export is not sharded: under a launcher the main process exports, the others stop here
    quantizer = _load_quantizer(args.model, image_processor=False, revision=args.revision)  # the export needs none
    if getattr(quantizer.model.config, "quantization_config", None) is None:
        raise DFQError(f"{args.model} is not a quantized model; quantize it first with `{PROG} quantize`.")
    report = to_onnx(quantizer.model, args.output, weight_only_int4=not args.no_int4_weights,
                     block_size=args.block_size, signed_weights=args.signed_weights, opset=args.opset)
    report_path = Path(args.output).with_suffix(".report.json")
    report.save(report_path)
    print(report.summary())
    print(f"report: {report_path}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import DFQError

    errors: list[type[BaseException]] = [DFQError, FileNotFoundError, OSError, ValueError]
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


@contextlib.contextmanager
def _verbose_logging(verbose: bool) -> Iterator[None]:
    """With `verbose`, shows the library's INFO logs (cache use, synthesis loss terms) on stderr, on the main process
    only (rank 0 under a launcher), written above the progress bars instead of through them."""
    if not verbose or os.environ.get("RANK", "0") != "0":
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("optimum_dfq")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm([logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs the handler of a parsed command; user errors become one line on stderr and exit status 2, a SIGTERM
    during synthesis ([`SynthesisTerminated`]) one line and status 143."""
    handler = getattr(args, "handler", None)
    if handler is None:
        (parser or build_parser()).print_help()
        return 2
    try:
        with _verbose_logging(getattr(args, "verbose", False)):
            return handler(args)
    except _user_errors() as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # Under torchrun / accelerate launch every process may hit the error: say which one printed it.
        rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{PROG}: error: {rank}{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        from .synthesis.engine import SynthesisTerminated

        if not isinstance(interrupt, SynthesisTerminated):
            raise
        # a scheduler's preemption: the batches being optimised are checkpointed in the cache, nothing to trace
        print(f"{PROG}: terminated by SIGTERM during synthesis; {_after_sigterm(args)}.", file=sys.stderr)
        return 128 + 15


def _after_sigterm(args: argparse.Namespace) -> str:
    """What a synthesis stopped by SIGTERM kept: nothing without a cache, else what the same command resumes from."""
    from .synthesis.cache import DISABLE_CACHE_ENV, default_cache_disabled

    if getattr(args, "no_cache", False):
        return "nothing was kept (--no-cache)"
    try:
        default_off = getattr(args, "cache_dir", None) is None and default_cache_disabled()
    except ValueError:  # a bad OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE value stops a run before it synthesizes
        default_off = False
    if default_off:
        return f"nothing was kept ({DISABLE_CACHE_ENV} turns the default synthesis cache off)"
    return "run the same command again to resume from what the synthesis cache kept"


def release_process_group() -> None:
    """Destroys the default process group, if a run under `torchrun` / `accelerate launch` made one.

    Gloo's worker threads still alive when the interpreter exits can abort a finished run with "terminate called
    without an active exception" (exit status -6 although every image was saved); torch asks for
    `destroy_process_group()` at the end of a successful run. Not called after an error: another process may still
    be waiting in a collective, and destroying the group then can hang.
    """
    distributed = sys.modules.get("torch.distributed")  # never imports torch just to find nothing to release
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `optimum-dfq` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    status = dispatch(args, parser)
    if status == 0:
        release_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
