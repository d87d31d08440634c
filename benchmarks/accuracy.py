"""Accuracy benchmark: every calibration source × bit preset (and backend ablations) on the reference models.

For each reference model in `examples/models/` this quantizes at W8A8, W6A6, W4A8, W4A4 and W3A4 with each
calibration source (real: 32 CIFAR-10 *train* images; gaussian; psaq; sardfq; dfq-vit; the library default) on the
RepQ-ViT backend, adds backend ablation rows (TanQ, scale selectors, correction, reconstruction) on the default
data-free source, evaluates every model on the CIFAR-10 *test* split (never used for calibration), and writes
`benchmarks/results/accuracy.{json,md,png}`.

Synthetic calibration sets depend only on (model, source, seed), so each is synthesized once and reused for every
bit preset and backend.

    python benchmarks/accuracy.py                       # full run (all models, full test split)
    python benchmarks/accuracy.py --quick               # smoke run into results/quick: 500 test images, fewer steps
    python benchmarks/accuracy.py --models examples/models/vit-cifar10 --bits w4a4 --sources real gaussian
    python benchmarks/accuracy.py --resume ...          # keep rows already in accuracy.json (same settings)
    python benchmarks/accuracy.py --resume --include /tmp/deit/accuracy.json   # merge a run made elsewhere
    python benchmarks/accuracy.py --resume --redo-sources sardfq --include /tmp/sardfq/accuracy.json  # replace rows

Rows are written to `accuracy.json` as soon as they are measured, so an interrupted run loses nothing, and runs on
different models (or sources) can be made one after the other with `--resume` and end up in one table, or side by side
in separate `--output-dir`s and merged with `--include`. The "default" rows name the synthesizer the library
defaults to; where the same run already exists under that synthesizer's own name (same backend and bits), it is
reused rather than recomputed (the row says `"same_as"`); on `--resume`, rows measured as "default" when the default
was another synthesizer become rows of that synthesizer's source. W8A8 rows
(`--onnx-bits`) are also exported with `optimum_dfq.export.to_onnx` and evaluated in ONNX Runtime (the table's
"onnxruntime" column).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# the sibling module; synthesized images, and so the rows, depend on the CPU's float kernels (cpu_description)
from _report import cpu_description, first_test_images, top1_from_predictions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
DATASET_HELP = "datasets folder with train and test splits of `img` / `label` columns (default: ../shared/data/cifar10)"
DEFAULT_BITS = ["w8a8", "w6a6", "w4a8", "w4a4", "w3a4"]
DEFAULT_SOURCES = ["real", "gaussian", "psaq", "sardfq", "dfq-vit", "default"]

#: Backend variants: name -> DFQConfig overrides (applied on top of the RepQ-ViT baseline).
BACKENDS: dict[str, dict[str, Any]] = {
    "repq": {},
    "+median": {"scale_selector": "median"},
    "+mad": {"scale_selector": "mad"},
    "+search": {"scale_selector": "search"},
    "+tanq": {"post_softmax": "tanq"},
    "+log2": {"post_softmax": "log2"},
    "+log-sqrt2": {"post_softmax": "log_sqrt2"},
    "+correction": {"correction": {"kind": "affine"}},
    "+reconstruction": {"reconstruction": {"iterations": 100}},
}
ABLATION_BITS = ["w4a4", "w3a4"]
#: Run only when named with --backends: log-sqrt2 is what `post_softmax="auto"` picks at 4-7 activation bits (the
#: default ablation widths), so there it repeats the `repq` row; at W3A3 and W8A8 `auto` picks TanQ instead.
OPT_IN_BACKENDS = {"+log-sqrt2"}
TARGETS_DOC = ("Targets (issue #6), per model, for the library default: W4A8 >= real W4A8 - 1.0; "
               "W4A4 >= real W4A4 - 5.0; W4A4 >= gaussian W4A4 + 5.0.")


def available_backends() -> dict[str, dict[str, Any]]:
    """Backend variants whose options this version of the library accepts."""
    from optimum_dfq import DFQConfig, DFQError

    usable = {}
    for name, overrides in BACKENDS.items():
        try:
            DFQConfig(**overrides)
        except (DFQError, TypeError):
            continue
        usable[name] = overrides
    return usable


def reference_models() -> list[Path]:
    return sorted(p for p in (ROOT / "examples" / "models").glob("*-cifar10") if (p / "config.json").exists())


def with_synthesis_iterations(config, total: int | None):
    """`config` with `total` synthesis steps split evenly over its synthesizer's phases (quick runs); iterations
    already given in its `synthesizer_kwargs`, and configs that do not synthesize pixels, are left as they are."""
    from optimum_dfq.synthesis import synthesizer_from_config

    if not total or config.calibration_dataset or config.synthesizer == "gaussian":
        return config
    phases = len(synthesizer_from_config(config).iterations)
    per_phase = max(1, total // phases)
    return config.replace(synthesizer_kwargs={"iterations": [per_phase] * phases, "warmup": max(1, per_phase // 5),
                                              **config.synthesizer_kwargs})


def calibration_for(source: str, model, processor, args, train) -> Any:
    from optimum_dfq import DataFreeViTQuantizer, DFQConfig

    name = DFQConfig().synthesizer if source == "default" else source
    kwargs = args.synthesizer_kwargs if name not in ("real", "gaussian") else {}  # options of pixel synthesizers
    config = DFQConfig(num_images=args.num_images, seed=args.seed, synthesizer_kwargs=kwargs,
                       **({} if name == "real" else {"synthesizer": name}))
    if name != "real":
        config = with_synthesis_iterations(config, args.synth_iterations)
    # Gaussian noise costs nothing to draw, so it has no cache
    cache_dir = (args.synthesis_cache or False) if name not in ("real", "gaussian") else None
    return DataFreeViTQuantizer.calibration_set(model, config, train if name == "real" else None, processor,
                                                cache_dir=cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(CIFAR), help=DATASET_HELP)
    parser.add_argument("--models", nargs="*", default=None, help="model folders (default: examples/models/*)")
    parser.add_argument("--bits", nargs="*", default=DEFAULT_BITS)
    parser.add_argument("--sources", nargs="*", default=DEFAULT_SOURCES)
    parser.add_argument("--backends", nargs="*", default=None,
                        help=f"backend variants: {', '.join(BACKENDS)} (default: all but {', '.join(OPT_IN_BACKENDS)})")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--synth-iterations", type=int, default=None, help="override synthesis iterations")
    parser.add_argument("--synthesizer-kwargs", type=json_object, default={},
                        help='JSON options for the pixel synthesizers, e.g. \'{"jitter_reference": 224}\' (recorded '
                             "in the settings: a run with other options is not merged)")
    parser.add_argument("--quick", action="store_true",
                        help="500 test images (all of a smaller split), 100 synthesis iterations")
    parser.add_argument("--output-dir", default=None,
                        help="where the tables go (default: benchmarks/results; with --quick, "
                             "benchmarks/results/quick, so that a smoke run does not replace the committed full run)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse rows of an existing accuracy.json measured with the same settings")
    parser.add_argument("--onnx-bits", nargs="*", default=["w8a8"],
                        help="bit presets whose rows are also evaluated through ONNX Runtime (needs onnxruntime)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ablation-bits", nargs="*", default=ABLATION_BITS,
                        help="bit presets of the backend ablation rows (on the default source)")
    parser.add_argument("--ablation-sources", nargs="*", default=["default"],
                        help="calibration sources that also get the backend ablation rows (default: the default only)")
    parser.add_argument("--include", nargs="*", default=[],
                        help="accuracy.json files of other runs (same settings) whose rows are merged in")
    parser.add_argument("--redo-bits", nargs="*", default=[],
                        help="with --resume: drop the kept rows of these bit presets for the models of this run, so "
                             "they are measured again or taken from --include (e.g. after a library default that "
                             "affects them changed)")
    parser.add_argument("--redo-sources", nargs="*", default=[],
                        help="with --resume: drop the kept rows of these calibration sources for the models of this "
                             "run, so they are measured again or taken from --include (e.g. after a synthesizer "
                             "changed)")
    parser.add_argument("--synthesis-cache", default=None,
                        help="synthesis cache folder: synthesized sets are kept there and reused by later runs "
                        "(default: none, so that the run's time includes synthesis)")
    args = parser.parse_args()
    if (args.redo_bits or args.redo_sources) and not args.resume:
        parser.error("--redo-bits/--redo-sources drop rows of the table that --resume keeps; add --resume.")
    if args.quick:
        args.synth_iterations = args.synth_iterations or 100
    if args.output_dir is None:
        args.output_dir = str(ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    args.plots = can_plot()
    if not args.plots:
        print('matplotlib is not installed (pip install "optimum-dfq[plot]"), so accuracy.png is not written')

    import torch
    from datasets import load_dataset

    from optimum_dfq import DataFreeViTQuantizer, DFQConfig, __version__
    from optimum_dfq.evaluation import evaluate_accuracy

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = available_backends()
    if args.backends is None:
        backends = {name: overrides for name, overrides in backends.items() if name not in OPT_IN_BACKENDS}
    elif unknown := [name for name in args.backends if name not in backends]:
        parser.error(f"unknown or unsupported backend variant(s) {unknown}; choose from {list(backends)}.")
    else:
        backends = {name: backends[name] for name in args.backends}
    train = load_dataset(args.dataset, split="train")
    test = first_test_images(load_dataset(args.dataset, split="test"), args.eval_limit, args.quick)
    models = [Path(m) for m in args.models] if args.models else reference_models()
    if not models:
        raise SystemExit("No reference model found under examples/models/ (train one with "
                         "examples/train_reference_model.py) and none given with --models.")

    settings = run_settings(args, len(test))
    args.commands = ["python benchmarks/accuracy.py " + shlex.join(sys.argv[1:])]
    default_source = DFQConfig().synthesizer
    args.included_seconds = {}
    rows, earlier_s = previous_rows(args, settings, default_source) if args.resume else ([], 0.0)
    if args.redo_bits or args.redo_sources:  # stale rows of this run's table; rows merged with --include replace them
        names = {m.name for m in models}
        rows = [r for r in rows if not (r["model"] in names and (
            r["bits"] in args.redo_bits or r["source"] in args.redo_sources
            or r.get("synthesizer") in args.redo_sources))]  # "default" rows of a re-measured synthesizer too
    for extra in args.include:
        extra_rows, extra_s = read_rows(Path(extra), args, settings, default_source)
        known = {row_key(r) for r in rows}
        rows += [r for r in extra_rows if row_key(r) not in known]
        # a file merged before only adds the time it ran since then
        earlier_s += extra_s - args.included_seconds.get(str(extra), 0.0)
        args.included_seconds[str(extra)] = extra_s
    done = {row_key(r) for r in rows}
    started = time.perf_counter() - earlier_s  # the reported time includes the runs whose rows are kept
    for model_dir in models:
        quantizer = DataFreeViTQuantizer.from_pretrained(str(model_dir))
        model, processor = quantizer.model.float().eval(), quantizer.image_processor
        if (model_dir.name, "float32", "-", "fp32") not in done:
            fp = evaluate_accuracy(model, test, processor, progress=False)
            rows.append({"model": model_dir.name, "source": "float32", "backend": "-", "bits": "fp32",
                         "top1": fp["top1"]})
            write_results(rows, args, settings, time.perf_counter() - started, __version__)
        fp_top1 = next(r["top1"] for r in rows if row_key(r) == (model_dir.name, "float32", "-", "fp32"))
        print(f"{model_dir.name}: FP32 top-1 {100 * fp_top1:.2f}%", flush=True)
        calibrations: dict[str, Any] = {}
        for source in args.sources:
            variants = [("repq", b) for b in args.bits]
            if source in args.ablation_sources:
                variants += [(name, b) for name in backends if name != "repq" for b in args.ablation_bits
                             if b in args.bits]
            variants = [(backend, b) for backend, b in variants if (model_dir.name, source, backend, b) not in done]
            if source == "default":  # the identical run under the synthesizer's own name is reused, not repeated
                measured = {row_key(r): r for r in rows}
                reused = [(b, measured[(model_dir.name, default_source, b, bits)]) for b, bits in variants
                          if (model_dir.name, default_source, b, bits) in measured]
                for backend, row in reused:
                    rows.append({**row, "source": "default", "synthesizer": default_source, "same_as": default_source})
                    variants.remove((backend, row["bits"]))
                if reused:
                    write_results(rows, args, settings, time.perf_counter() - started, __version__)
            if not variants:
                continue
            synthesizer = default_source if source == "default" else source
            t0 = time.perf_counter()
            if synthesizer not in calibrations:  # "default" reuses the set of the synthesizer it names
                calibrations[synthesizer] = calibration_for(synthesizer, model, processor, args, train)
            calibration = calibrations[synthesizer]
            synth_s = time.perf_counter() - t0
            for backend, bits in variants:
                config = DFQConfig(bits=bits, num_images=args.num_images, seed=args.seed, **backends[backend])
                t1 = time.perf_counter()
                qmodel = quantizer.quantize(model, config=config, calibration_dataset=calibration)
                quant_s = time.perf_counter() - t1
                result = evaluate_accuracy(qmodel, test, processor, progress=False)
                row = {"model": model_dir.name, "source": source, "backend": backend, "bits": bits,
                       "top1": result["top1"], "synthesis_s": round(synth_s, 1), "quantize_s": round(quant_s, 1)}
                if source == "default":
                    row["synthesizer"] = synthesizer
                line = f"  {source:>8} {backend:>15} {bits}: top-1 {100 * result['top1']:.2f}%"
                if bits in args.onnx_bits:
                    row["top1_onnxruntime"] = onnxruntime_top1(qmodel, test, processor)
                    line += f" (onnxruntime {100 * row['top1_onnxruntime']:.2f}%)"
                rows.append(row)
                write_results(rows, args, settings, time.perf_counter() - started, __version__)
                print(line, flush=True)
    write_results(rows, args, settings, time.perf_counter() - started, __version__)
    plot_note = ", accuracy.png" if args.plots else " (no accuracy.png)"
    print(f"wrote {Path(args.output_dir) / 'accuracy.md'}, accuracy.json, headline.md{plot_note}")


def json_object(text: str) -> dict[str, Any]:
    """`--synthesizer-kwargs`: a JSON object of keyword arguments."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"jitter_reference\": 224}}', got {text}")
    return value


def run_settings(args, eval_images: int) -> dict[str, Any]:
    """What makes two rows comparable (a resumed run only reuses rows measured with the same settings)."""
    settings = {"eval_images": eval_images, "num_images": args.num_images, "seed": args.seed,
                "synth_iterations": args.synth_iterations or "synthesizer default"}
    if args.synthesizer_kwargs:  # only when given, so that tables measured before the option still merge
        settings["synthesizer_kwargs"] = args.synthesizer_kwargs
    return settings | dataset_setting(args)


def dataset_setting(args) -> dict[str, str]:
    """`{"dataset": path}` for a dataset other than CIFAR-10 (absent for CIFAR-10, as in tables made before)."""
    return {} if Path(args.dataset).resolve() == CIFAR.resolve() else {"dataset": str(Path(args.dataset).resolve())}


def same_settings(previous_meta: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a saved run was measured with `settings` (options recorded only when set, such as `dataset` and
    `synthesizer_kwargs`, must be absent from both or equal), so that its rows may be merged with this run's."""
    keys = set(settings) | ({"synthesizer_kwargs", "dataset"} & set(previous_meta))
    return {k: previous_meta.get(k) for k in keys} == {k: settings.get(k) for k in keys}


def dataset_label(settings: dict[str, Any]) -> str:
    """How reports name the dataset of a run's settings."""
    return f"`{settings['dataset']}`" if settings.get("dataset") else "CIFAR-10"


def bit_order(bits) -> list[str]:
    """Distinct bit presets, the benchmark's presets first in their usual order (rows may be re-measured later)."""
    distinct = list(dict.fromkeys(bits))
    return sorted(distinct, key=lambda b: (DEFAULT_BITS.index(b) if b in DEFAULT_BITS else len(DEFAULT_BITS)))


def row_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return row["model"], row["source"], row["backend"], row["bits"]


def previous_rows(args, settings: dict[str, Any], default_source: str) -> tuple[list[dict[str, Any]], float]:
    path = Path(args.output_dir) / "accuracy.json"
    if not path.exists():
        return [], 0.0
    return read_rows(path, args, settings, default_source)


def read_rows(path: Path, args, settings: dict[str, Any], default_source: str) -> tuple[list[dict[str, Any]], float]:
    """Rows of an earlier run measured with the same settings (and its commands, added to this run's)."""
    if not path.exists():
        raise SystemExit(f"{path} does not exist.")
    previous = json.loads(path.read_text())
    if not same_settings(previous["meta"], settings):
        raise SystemExit(f"{path} was measured with other settings ({previous['meta']}); drop --resume or match them.")
    args.commands = [c for c in previous["meta"].get("commands", []) if c not in args.commands] + args.commands
    if path == Path(args.output_dir) / "accuracy.json":
        args.included_seconds = dict(previous["meta"].get("included_seconds", {}))
    rows = []
    for row in previous["rows"]:
        if row["source"] == "default" and row.get("synthesizer") != default_source:
            # measured when the default was another synthesizer: it is a row of that synthesizer's source
            row = {k: v for k, v in row.items() if k not in ("synthesizer", "same_as")} | {"source": row["synthesizer"]}
            if any(row_key(r) == row_key(row) for r in previous["rows"]):
                continue
        rows.append(row)
    return rows, float(previous["meta"].get("seconds", 0))


def target_checks(model_rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for the library default, checked against this model's rows (where they exist)."""
    def top1(source: str, bits: str) -> float | None:
        hit = [r["top1"] for r in model_rows if (r["source"], r["backend"], r["bits"]) == (source, "repq", bits)]
        return 100 * hit[0] if hit else None

    checks = [("W4A8 >= real - 1.0", top1("default", "w4a8"), top1("real", "w4a8"), -1.0),
              ("W4A4 >= real - 5.0", top1("default", "w4a4"), top1("real", "w4a4"), -5.0),
              ("W4A4 >= gaussian + 5.0", top1("default", "w4a4"), top1("gaussian", "w4a4"), 5.0)]
    lines = []
    for name, value, reference, margin in checks:
        if value is None or reference is None:
            continue
        verdict = "met" if value >= reference + margin else "MISSED"
        lines.append(f"- {name}: {value:.2f} vs {reference + margin:.2f} ({verdict})")
    return lines


def onnxruntime_top1(qmodel, test, processor) -> float:
    """Top-1 of the model exported with `optimum_dfq.export.to_onnx`, run in ONNX Runtime (scored with `evaluate`)."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from optimum_dfq.export import to_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        to_onnx(qmodel, path, verify=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        predicted = []
        for start in range(0, len(test), 250):
            batch = test[start : start + 250]
            images = [image.convert("RGB") for image in batch["img"]]
            pixels = processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
            predicted += session.run(["logits"], {"pixel_values": pixels})[0].argmax(-1).tolist()
    return top1_from_predictions(predicted, test["label"])


def write_results(rows: list[dict[str, Any]], args, settings: dict[str, Any], seconds: float, version: str) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy.json"
    meta = {"library_version": version, "seconds": round(seconds), "machine": cpu_description(), **settings,
            "commands": args.commands, "included_seconds": getattr(args, "included_seconds", {})}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    dataset = dataset_label(meta)
    lines = [f"# Accuracy benchmark ({dataset} test top-1, %)", "",
             "Commands: " + "; ".join(f"`{c}`" for c in meta["commands"])
             + (f"; {meta['eval_images']} test images; {args.num_images} calibration images "
                f"(real: {dataset} *train* images); library {version}; {meta['machine']}.")
             + (f" Pixel synthesizers ran with `{json.dumps(meta['synthesizer_kwargs'])}`."
                if meta.get("synthesizer_kwargs") else ""), "",
             ("The `onnxruntime` cells are the same quantized model exported with `optimum_dfq.export.to_onnx` and "
              "run in ONNX Runtime. Rows marked `same_as` in accuracy.json reuse the identical run of that "
              "synthesizer. Backend `repq` is the library's defaults at that preset (RepQ-ViT backend, `auto` "
              "options resolved per bit width); `+name` changes one option (`BACKENDS` in benchmarks/accuracy.py)."),
             "", TARGETS_DOC, ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == model]
        fp = next((r["top1"] for r in model_rows if r["source"] == "float32"), float("nan"))
        bits = bit_order(r["bits"] for r in model_rows if r["bits"] != "fp32")
        onnx_bits = [b for b in bits if any("top1_onnxruntime" in r for r in model_rows if r["bits"] == b)]
        header = bits + [f"{b} onnxruntime" for b in onnx_bits]
        lines += [f"## {model} (FP32 {100 * fp:.2f}%)", "", "| source | backend | " + " | ".join(header) + " |",
                  "|---|---|" + "---:|" * len(header)]
        keys = dict.fromkeys((r["source"], r["backend"]) for r in model_rows if r["bits"] != "fp32")
        for source, backend in sorted(keys, key=lambda key: source_rank(key[0])):  # stable: backends as measured
            cells = []
            for column in header:
                onnx = column.endswith("onnxruntime")
                b, field = (column.split()[0], "top1_onnxruntime") if onnx else (column, "top1")
                hit = [r for r in model_rows if (r["source"], r["backend"], r["bits"]) == (source, backend, b)]
                cells.append(f"{100 * hit[0][field]:.2f}" if hit and field in hit[0] else "–")
            name = source
            synth = next((r.get("synthesizer") for r in model_rows
                          if r["source"] == source and "synthesizer" in r), None)
            if synth:
                name = f"{source} (= {synth})"
            lines.append(f"| {name} | {backend} | " + " | ".join(cells) + " |")
        checks = target_checks(model_rows)
        lines += ["", "Targets for the default:", *checks] if checks else []
        lines.append("")
    (out / "accuracy.md").write_text("\n".join(lines))
    (out / "headline.md").write_text(headline(rows))
    if args.plots:
        plot(rows, out / "accuracy.png", dataset)


def source_rank(source: str) -> int:
    """Table order of a calibration source: the benchmark's sources in their usual order, then any others."""
    return DEFAULT_SOURCES.index(source) if source in DEFAULT_SOURCES else len(DEFAULT_SOURCES)


SOURCE_NAMES = {"real": "real images (32 train images)", "gaussian": "Gaussian noise", "psaq": "PSAQ-ViT synthesis",
                "sardfq": "SARDFQ synthesis", "dfq-vit": "DFQ-ViT synthesis"}


def headline(rows: list[dict[str, Any]]) -> str:
    """The README's headline: RepQ-ViT backend, every model and calibration source, top-1 % per bit preset."""
    bits = bit_order(r["bits"] for r in rows if r["bits"] != "fp32" and r["backend"] == "repq")
    lines = ["| model (FP32 top-1) | calibration | " + " | ".join(b.upper() for b in bits) + " |",
             "|---|---|" + "---:|" * len(bits)]
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == model]
        fp = next((r["top1"] for r in model_rows if r["source"] == "float32"), float("nan"))
        for source, name in SOURCE_NAMES.items():
            cells = [next((f"{100 * r['top1']:.2f}" for r in model_rows
                           if (r["source"], r["backend"], r["bits"]) == (source, "repq", b)), "–") for b in bits]
            if all(c == "–" for c in cells):
                continue
            is_default = any(r.get("synthesizer") == source for r in model_rows if r["source"] == "default")
            label = f"**{name}** (library default)" if is_default else name
            lines.append(f"| {model} ({100 * fp:.2f}) | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def can_plot() -> bool:
    """Whether matplotlib (the `[plot]` extra) can be imported, to draw accuracy.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        return False
    return True


def plot(rows: list[dict[str, Any]], path: Path, dataset: str = "CIFAR-10") -> None:
    """Draws top-1 against bits per model (RepQ-ViT rows) to `path`; needs matplotlib (`can_plot()`)."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        model_rows = [r for r in rows if r["model"] == model and r["backend"] == "repq"]
        bits = bit_order(r["bits"] for r in model_rows)
        for source in sorted(dict.fromkeys(r["source"] for r in model_rows), key=source_rank):
            ys = [next((100 * r["top1"] for r in model_rows if r["source"] == source and r["bits"] == b), None)
                  for b in bits]
            ax.plot(bits, ys, marker="o", label=source)
        fp = next(r["top1"] for r in rows if r["model"] == model and r["source"] == "float32")
        ax.axhline(100 * fp, color="gray", linestyle="--", label="float32")
        ax.set_title(model)
        ax.set_xlabel("bits")
        ax.set_ylabel(f"{Path(dataset.strip('`')).name} top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
