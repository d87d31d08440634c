"""Recipe benchmark: every YAML recipe of `recipes/`, run as written, on every reference model.

`benchmarks/accuracy.py` varies one thing at a time (calibration source x bit preset, backend options one by one);
the recipes combine them (PSAQ-ViT's MinMax backend, DopQ-ViT's TanQ + reconstruction, SARDFQ's log2 softmax +
reconstruction, ...). This command quantizes each reference model with each recipe at the recipe's own bit preset,
evaluates on the CIFAR-10 *test* split, and writes `benchmarks/results/recipes/recipes.{json,md}`.

A recipe that calibrates on a real dataset (`calibration_dataset:` names a Hub dataset, e.g. ImageNet for the
RepQ-ViT recipe) is run on `--real-images` CIFAR-10 *train* images instead (the Hub is not needed; the row says so).
Synthesized sets are kept in `--synthesis-cache`, so recipes that synthesize with the same settings (the DFQ-ViT
default is used by four recipes) share one synthesis per model.

    python benchmarks/recipes.py                                 # every recipe, every model, full test split
    python benchmarks/recipes.py recipes/dfq_vit_w3a8.yaml --set synthesizer_kwargs='{"hardness_weight": 10}' \\
        --label +hardness --resume                               # a variant, added to the same table
    python benchmarks/recipes.py --quick                         # smoke run into recipes/quick: 500 test images

Rows are written as soon as they are measured; `--resume` keeps the rows of an earlier run with the same settings,
and `--include` merges the tables of runs made side by side (one process per model, say).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from _report import cpu_description, first_test_images

# the benchmark next door
from accuracy import (
    CIFAR,
    DATASET_HELP,
    ROOT,
    dataset_label,
    dataset_setting,
    onnxruntime_top1,
    reference_models,
    same_settings,
    with_synthesis_iterations,
)

RECIPES = ROOT / "recipes"
ONNX_RECIPES = ("w8a8_integer_onnx",)


def override(text: str) -> tuple[str, Any]:
    """`--set FIELD=JSON`: a `DFQConfig` field and its value as JSON (a bare word is taken as a string)."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=JSON, e.g. synthesizer_kwargs='{{\"hardness_weight\": 10}}'"
                                         f", got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def recipe_config(path: Path, overrides: dict[str, Any], synth_iterations: int | None):
    """The recipe's `DFQConfig` with the command's overrides (and, for quick runs, fewer synthesis steps)."""
    from optimum_dfq import DFQConfig

    config = DFQConfig.from_yaml(path)
    if overrides:
        config = DFQConfig.from_dict({**config.to_dict(), **overrides})
    return with_synthesis_iterations(config, synth_iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe files (default: every recipes/*.yaml)")
    parser.add_argument("--dataset", default=str(CIFAR), help=DATASET_HELP)
    parser.add_argument("--models", nargs="*", default=None, help="model folders (default: examples/models/*)")
    parser.add_argument("--set", dest="overrides", type=override, action="append", default=[], metavar="FIELD=JSON",
                        help="override a recipe field (repeatable); give the variant a --label")
    parser.add_argument("--label", default="", help="suffix of the recipe's row name, e.g. +hardness")
    parser.add_argument("--real-images", type=int, default=32,
                        help="CIFAR-10 train images for recipes that calibrate on a real dataset (default 32)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--synth-iterations", type=int, default=None, help="override synthesis iterations")
    parser.add_argument("--quick", action="store_true",
                        help="500 test images (all of a smaller split), 100 synthesis iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--synthesis-cache", default=None,
                        help="synthesis cache folder, shared by the recipes (default: the library's, "
                        "$HF_HOME/optimum_dfq/synthesis)")
    parser.add_argument("--output-dir", default=None,
                        help="where the tables go (default: benchmarks/results/recipes; with --quick, "
                             "benchmarks/results/recipes/quick, so that a smoke run does not replace the committed "
                             "full run)")
    parser.add_argument("--resume", action="store_true", help="keep rows of an earlier run with the same settings")
    parser.add_argument("--include", nargs="*", default=[],
                        help="recipes.json files of runs made side by side (same settings) whose rows are merged in")
    args = parser.parse_args()
    if args.overrides and not args.label:
        parser.error("--set changes the recipe: name the variant with --label (e.g. --label +hardness).")
    if args.quick:
        args.synth_iterations = args.synth_iterations or 100
    if args.output_dir is None:
        args.output_dir = str(ROOT / "benchmarks" / "results" / "recipes" / ("quick" if args.quick else ""))

    import torch
    from datasets import load_dataset

    from optimum_dfq import DataFreeViTQuantizer, __version__
    from optimum_dfq.evaluation import evaluate_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [Path(p) for p in args.recipes] or sorted(RECIPES.glob("*.yaml"))
    overrides = dict(args.overrides)
    configs = {path: recipe_config(path, overrides, args.synth_iterations) for path in recipes}
    models = [Path(m) for m in args.models] if args.models else reference_models()
    if not models:
        raise SystemExit("No reference model found under examples/models/ and none given with --models.")
    train = load_dataset(args.dataset, split="train")
    test = first_test_images(load_dataset(args.dataset, split="test"), args.eval_limit, args.quick)

    settings = {"eval_images": len(test), "real_images": args.real_images,
                "synth_iterations": args.synth_iterations or "recipe's", **dataset_setting(args)}
    out = Path(args.output_dir)
    rows, commands, earlier_s = previous_run(out / "recipes.json", settings) if args.resume else ([], [], 0.0)
    for path in args.include:
        if not Path(path).exists():
            raise SystemExit(f"{path} does not exist.")
        extra_rows, extra_commands, extra_s = previous_run(Path(path), settings)
        known = {(r["recipe"], r["model"]) for r in rows}
        rows += [r for r in extra_rows if (r["recipe"], r["model"]) not in known]
        commands += [c for c in extra_commands if c not in commands]
        earlier_s += extra_s
    commands.append("python benchmarks/recipes.py " + shlex.join(sys.argv[1:]))
    done = {(r["recipe"], r["model"]) for r in rows}
    started = time.perf_counter() - earlier_s
    for model_dir in models:
        quantizer = DataFreeViTQuantizer.from_pretrained(str(model_dir))
        model, processor = quantizer.model.float().eval(), quantizer.image_processor
        if ("float32", model_dir.name) not in done:
            rows.append({"recipe": "float32", "model": model_dir.name, "bits": "fp32",
                         "top1": evaluate_accuracy(model, test, processor, progress=False)["top1"]})
        for path, config in configs.items():
            name = path.stem + args.label
            if (name, model_dir.name) in done:
                continue
            real = None
            if config.calibration_dataset:  # a Hub dataset in the recipe: calibrate on CIFAR-10 train images here
                config = config.replace(calibration_dataset={}, num_images=args.real_images)
                real = train
            t0 = time.perf_counter()
            qmodel = quantizer.quantize(model, config=config, calibration_dataset=real,
                                        cache_dir=None if real is not None or config.synthesizer == "gaussian"
                                        else args.synthesis_cache)
            row = {"recipe": name, "model": model_dir.name, "bits": config.bits,
                   "calibration": f"{args.real_images} {dataset_label(settings)} train images" if real is not None
                   else f"{config.num_images} images from '{config.synthesizer}'",
                   "quantize_s": round(time.perf_counter() - t0, 1),
                   "top1": evaluate_accuracy(qmodel, test, processor, progress=False)["top1"]}
            line = f"{model_dir.name} {name} ({config.bits}): top-1 {100 * row['top1']:.2f}%"
            if path.stem in ONNX_RECIPES:
                row["top1_onnxruntime"] = onnxruntime_top1(qmodel, test, processor)
                line += f" (onnxruntime {100 * row['top1_onnxruntime']:.2f}%)"
            rows.append(row)
            write_results(out, rows, settings, commands, time.perf_counter() - started, __version__)
            print(line, flush=True)
    write_results(out, rows, settings, commands, time.perf_counter() - started, __version__)
    print(f"wrote {out / 'recipes.md'} and recipes.json")


def previous_run(path: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str], float]:
    """Rows, commands and seconds of an earlier run with the same settings."""
    if not path.exists():
        return [], [], 0.0
    previous = json.loads(path.read_text())
    if not same_settings(previous["meta"], settings):
        raise SystemExit(f"{path} was measured with other settings ({previous['meta']}); drop --resume or match them.")
    return previous["rows"], previous["meta"]["commands"], float(previous["meta"]["seconds"])


def write_results(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], commands: list[str],
                  seconds: float, version: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {**settings, "library_version": version, "seconds": round(seconds), "machine": cpu_description(),
            "python": platform.python_version(), "commands": commands}
    (out / "recipes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    names = sorted({r["recipe"] for r in rows if r["recipe"] != "float32"})  # a variant right after its recipe
    cell = {(r["recipe"], r["model"]): r for r in rows}
    lines = [f"# Recipe benchmark ({dataset_label(settings)} test top-1, %)", "",
             (f"{settings['eval_images']} test images; library {version}; {meta['machine']}; {meta['seconds']} s "
              "summed over the runs, made by:"), "", *(f"- `{c}`" for c in commands), "",
             ("Each recipe of `recipes/` as written, at its own bit preset. Real-data recipes calibrate on "
              f"{settings['real_images']} {dataset_label(settings)} *train* images instead of their Hub dataset. "
              "`quantize s` includes synthesis unless the set came from the synthesis cache (recipes with the same "
              "synthesis settings share one set per model)."), "",
             "| recipe | bits | calibration | " + " | ".join(models) + " | quantize s |",
             "|---|---|---|" + "---:|" * (len(models) + 1)]
    fp = [f"{100 * cell[('float32', m)]['top1']:.2f}" if ("float32", m) in cell else "–" for m in models]
    lines.append("| float32 | – | – | " + " | ".join(fp) + " | – |")
    for name in names:
        hits = [cell.get((name, m)) for m in models]
        first = next(h for h in hits if h)
        values = []
        for hit in hits:
            text = f"{100 * hit['top1']:.2f}" if hit else "–"
            if hit and "top1_onnxruntime" in hit:
                text += f" (ORT {100 * hit['top1_onnxruntime']:.2f})"
            values.append(text)
        seconds_cells = "/".join(f"{h['quantize_s']:.0f}" for h in hits if h)
        lines.append(f"| {name} | {first['bits']} | {first['calibration']} | " + " | ".join(values)
                     + f" | {seconds_cells} |")
    lines += ["", "ORT: the same quantized model exported with `optimum_dfq.export.to_onnx` and run in ONNX Runtime.",
              ""]
    (out / "recipes.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
