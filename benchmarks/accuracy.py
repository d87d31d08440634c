"""Accuracy benchmark: every calibration source × bit preset (and backend ablations) on the reference models.

For each reference model in `examples/models/` this quantizes at W8A8, W6A6, W4A8, W4A4 and W3A4 with each
calibration source (real: 32 CIFAR-10 *train* images; gaussian; psaq; sardfq; dfq-vit; the library default) on the
RepQ-ViT backend, adds backend ablation rows (TanQ, scale selectors, correction, reconstruction) on the default
data-free source, evaluates every model on the CIFAR-10 *test* split (never used for calibration), and writes
`benchmarks/results/accuracy.{json,md,png}`.

Synthetic calibration sets depend only on (model, source, seed), so each is synthesized once and reused for every
bit preset and backend.

    python benchmarks/accuracy.py                       # full run (all models, full test split)
    python benchmarks/accuracy.py --quick               # smoke run: 500 test images, short synthesis
    python benchmarks/accuracy.py --models examples/models/vit-cifar10 --bits w4a4 --sources real gaussian
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
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
    "+correction": {"correction": {"kind": "affine"}},
    "+reconstruction": {"reconstruction": {"iterations": 100}},
}
ABLATION_BITS = ["w4a4", "w3a4"]


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


def calibration_for(source: str, model, processor, args, train) -> Any:
    from optimum_dfq import DFQConfig, get_synthesizer
    from optimum_dfq.calibration import calibration_set_from_dataset

    if source == "real":
        return calibration_set_from_dataset(train, processor, args.num_images, seed=args.seed)
    name = DFQConfig().synthesizer if source == "default" else source
    kwargs: dict[str, Any] = {}
    if args.synth_iterations and name != "gaussian":
        phases = len(get_synthesizer(name).iterations)
        per_phase = max(1, args.synth_iterations // phases)
        kwargs = {"iterations": [per_phase] * phases, "warmup": max(1, per_phase // 5)}
    return get_synthesizer(name, **kwargs).synthesize(model, args.num_images, seed=args.seed,
                                                      image_processor=processor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="model folders (default: examples/models/*)")
    parser.add_argument("--bits", nargs="*", default=DEFAULT_BITS)
    parser.add_argument("--sources", nargs="*", default=DEFAULT_SOURCES)
    parser.add_argument("--backends", nargs="*", default=None, help="backend variants (default: all available)")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--synth-iterations", type=int, default=None, help="override synthesis iterations")
    parser.add_argument("--quick", action="store_true", help="500 test images, 100 synthesis iterations")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.quick:
        args.eval_limit = args.eval_limit or 500
        args.synth_iterations = args.synth_iterations or 100

    import torch
    from datasets import load_dataset

    from optimum_dfq import DataFreeViTQuantizer, DFQConfig, __version__
    from optimum_dfq.evaluation import evaluate_accuracy

    torch.manual_seed(args.seed)
    backends = available_backends()
    if args.backends is not None:
        backends = {name: backends[name] for name in args.backends if name in backends}
    train = load_dataset(str(CIFAR), split="train")
    test = load_dataset(str(CIFAR), split="test")
    if args.eval_limit:
        test = test.select(range(args.eval_limit))
    models = [Path(m) for m in args.models] if args.models else reference_models()
    if not models:
        raise SystemExit("No reference model found under examples/models/ (train one with "
                         "examples/train_reference_model.py) and none given with --models.")

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model_dir in models:
        quantizer = DataFreeViTQuantizer.from_pretrained(str(model_dir))
        model, processor = quantizer.model.float().eval(), quantizer.image_processor
        fp = evaluate_accuracy(model, test, processor, progress=False)
        rows.append({"model": model_dir.name, "source": "float32", "backend": "-", "bits": "fp32",
                     "top1": fp["top1"]})
        print(f"{model_dir.name}: FP32 top-1 {100 * fp['top1']:.2f}%", flush=True)
        for source in args.sources:
            t0 = time.perf_counter()
            calibration = calibration_for(source, model, processor, args, train)
            synth_s = time.perf_counter() - t0
            variants = [("repq", b) for b in args.bits]
            if source == "default":
                variants += [(name, b) for name in backends if name != "repq" for b in ABLATION_BITS if b in args.bits]
            for backend, bits in variants:
                config = DFQConfig(bits=bits, num_images=args.num_images, seed=args.seed, **backends[backend])
                t1 = time.perf_counter()
                qmodel = quantizer.quantize(model, config=config, calibration_dataset=calibration)
                quant_s = time.perf_counter() - t1
                result = evaluate_accuracy(qmodel, test, processor, progress=False)
                rows.append({"model": model_dir.name, "source": source, "backend": backend, "bits": bits,
                             "top1": result["top1"], "synthesis_s": round(synth_s, 1),
                             "quantize_s": round(quant_s, 1)})
                print(f"  {source:>8} {backend:>15} {bits}: top-1 {100 * result['top1']:.2f}%", flush=True)
    write_results(rows, args, time.perf_counter() - started, __version__)


def write_results(rows: list[dict[str, Any]], args, seconds: float, version: str) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"library_version": version, "seconds": round(seconds), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPU cores", "eval_images": args.eval_limit or 10000, "num_images": args.num_images,
            "seed": args.seed, "synth_iterations": args.synth_iterations or "synthesizer default",
            "command": "python benchmarks/accuracy.py" + (" --quick" if args.quick else "")}
    (out / "accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Accuracy benchmark (CIFAR-10 test top-1, %)", "",
             f"Command: `{meta['command']}`; {meta['eval_images']} test images; {args.num_images} calibration images; "
             f"library {version}; {meta['machine']}; took {seconds / 60:.0f} min.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == model]
        fp = next(r["top1"] for r in model_rows if r["source"] == "float32")
        bits = list(dict.fromkeys(r["bits"] for r in model_rows if r["bits"] != "fp32"))
        lines += [f"## {model} (FP32 {100 * fp:.2f}%)", "", "| source | backend | " + " | ".join(bits) + " |",
                  "|---|---|" + "---|" * len(bits)]
        keys = dict.fromkeys((r["source"], r["backend"]) for r in model_rows if r["bits"] != "fp32")
        for source, backend in keys:
            cells = []
            for b in bits:
                hit = [r for r in model_rows if (r["source"], r["backend"], r["bits"]) == (source, backend, b)]
                cells.append(f"{100 * hit[0]['top1']:.2f}" if hit else "–")
            lines.append(f"| {source} | {backend} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "accuracy.md").write_text("\n".join(lines))
    plot(rows, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.md'}, accuracy.json, accuracy.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install optimum-dfq[plot]); skipping the plot")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        model_rows = [r for r in rows if r["model"] == model and r["backend"] == "repq"]
        bits = list(dict.fromkeys(r["bits"] for r in model_rows))
        for source in dict.fromkeys(r["source"] for r in model_rows):
            ys = [next((100 * r["top1"] for r in model_rows if r["source"] == source and r["bits"] == b), None)
                  for b in bits]
            ax.plot(bits, ys, marker="o", label=source)
        fp = next(r["top1"] for r in rows if r["model"] == model and r["source"] == "float32")
        ax.axhline(100 * fp, color="gray", linestyle="--", label="float32")
        ax.set_title(model)
        ax.set_xlabel("bits")
        ax.set_ylabel("CIFAR-10 top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
