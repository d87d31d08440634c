"""Which quantizer sites cost accuracy, for each calibration source: leave one activation site in floating point.

For each reference model and calibration source, quantizes with the library defaults, evaluates, then evaluates
again with the activation quantizers of one site switched off (weights stay quantized), for every site of
`optimum_dfq.calibration.sites.ACTIVATION_SITES` (image input, post-LayerNorm inputs of q/k/v and fc1, Q, K, the
softmax output, V, the inputs of o_proj, fc2, Swin's reduction and the classifier). A site whose float version
recovers much more accuracy under one source than under another is where that source's calibration differs.

Written to explain issue #6's last target (data-free >= Gaussian noise + 5 points at W4A4): it shows at which
sites noise calibration loses accuracy on each reference model, and so why the gap is large on Swin and small on
ViT and DeiT. Calibration images are drawn as in `benchmarks/accuracy.py` (same seed, same synthesis cache).

    python benchmarks/site_attribution.py                      # W4A4; real, gaussian, dfq-vit; 2000 test images
    python benchmarks/site_attribution.py --models examples/models/swin-cifar10 --eval-limit 500 \\
        --synth-iterations 40                                   # a quick look
    python benchmarks/site_attribution.py --synthesis-cache /tmp/cache   # reuse accuracy.py's synthesized sets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# synthesized images, and so the rows, depend on the CPU's float kernels
from _report import cpu_description, first_test_images
from accuracy import (  # the sibling benchmark script
    CIFAR,
    DATASET_HELP,
    ROOT,
    calibration_for,
    dataset_label,
    dataset_setting,
    json_object,
    reference_models,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(CIFAR), help=DATASET_HELP)
    parser.add_argument("--models", nargs="*", default=None, help="model folders (default: examples/models/*-cifar10)")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--sources", nargs="*", default=["real", "gaussian", "dfq-vit"])
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synth-iterations", type=int, default=None, help="fewer synthesis steps (quick runs)")
    parser.add_argument("--synthesis-cache", default=None)
    parser.add_argument("--synthesizer-kwargs", type=json_object, default={},
                        help="JSON object of options for the pixel synthesizers, as in benchmarks/accuracy.py")
    parser.add_argument("--eval-limit", type=int, default=2000, help="first N CIFAR-10 test images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "site_attribution"))
    args = parser.parse_args()

    import torch
    from datasets import load_dataset

    from optimum_dfq import DataFreeViTQuantizer, DFQConfig, __version__
    from optimum_dfq.calibration import activation_sites, quantization_disabled
    from optimum_dfq.evaluation import evaluate_accuracy
    from optimum_dfq.models import get_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train = load_dataset(args.dataset, split="train")
    test = first_test_images(load_dataset(args.dataset, split="test"), args.eval_limit)
    models = [Path(m) for m in args.models] if args.models else reference_models()
    rows: list[dict[str, Any]] = []
    for folder in models:
        quantizer = DataFreeViTQuantizer.from_pretrained(str(folder))
        model, processor = quantizer.model.float().eval(), quantizer.image_processor

        def top1(m, processor=processor) -> float:
            return 100 * evaluate_accuracy(m, test, processor, top_k=(1,), progress=False)["top1"]

        fp = top1(model)
        print(f"{folder.name}: FP32 {fp:.2f}", flush=True)
        for source in args.sources:
            calibration = calibration_for(source, model, processor, args, train)
            config = DFQConfig(bits=args.bits, num_images=args.num_images, seed=args.seed)
            qmodel = quantizer.quantize(model, config=config, calibration_dataset=calibration)
            probe = calibration.pixel_values[:1]
            sites = activation_sites(qmodel, get_adapter(qmodel), probe)
            row = {"model": folder.name, "source": source, "fp32": fp, "quantized": top1(qmodel),
                   "sites": {}, "quantizers": {site: len(names) for site, names in sites.items()}}
            for site, names in sites.items():
                with quantization_disabled(qmodel, names):
                    row["sites"][site] = top1(qmodel)
                print(f"{folder.name} | {source} | {site} in float: {row['sites'][site]:.2f} "
                      f"(all quantized {row['quantized']:.2f})", flush=True)
            rows.append(row)
    meta = {"library_version": __version__, "bits": args.bits, "eval_images": len(test),
            "num_images": args.num_images, "seed": args.seed, "synth_iterations": args.synth_iterations,
            "synthesizer_kwargs": args.synthesizer_kwargs, **dataset_setting(args),
            "seconds": round(time.perf_counter() - started),
            "command": "python benchmarks/site_attribution.py " + " ".join(sys.argv[1:]),
            "machine": f"{cpu_description()}, {torch.get_num_threads()} threads"}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_attribution.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "site_attribution.md").write_text(report(rows, meta))
    print(report(rows, meta))


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    sources = list(dict.fromkeys(r["source"] for r in rows))
    lines = [f"# {meta['bits'].upper()}: accuracy recovered by leaving one activation site in floating point", "",
             (f"Top-1 (%) on the first {meta['eval_images']} {dataset_label(meta)} test images; library defaults, "
              f"{meta['num_images']} calibration images per source, seed {meta['seed']}; weights stay quantized. Each "
              "cell: accuracy with that site's activation quantizers off, and in brackets the change against the "
              "fully quantized model. The last column is how much of the gap between the first two sources that "
              f"site accounts for. Library {meta['library_version']}; {meta['seconds']} s on {meta['machine']}; "
              f"`{meta['command']}`."), ""]
    pair = sources[:2] if len(sources) >= 2 else []  # the share column compares the first two sources

    def share(values: dict[str, float]) -> str:
        return f" {values[pair[1]] - values[pair[0]] + 0.0:+.2f} |" if pair else ""  # + 0.0: no "-0.00"

    for model in dict.fromkeys(r["model"] for r in rows):
        by_source = {r["source"]: r for r in rows if r["model"] == model}
        first = by_source[sources[0]]
        lines += [f"## {model} (FP32 {first['fp32']:.2f})", "",
                  "| site (quantizers) | " + " | ".join(sources) + " |"
                  + (f" share of the {pair[0]} - {pair[1]} gap |" if pair else ""),
                  "|---|" + "---:|" * (len(sources) + len(pair[:1]))]
        quantized = {source: row["quantized"] for source, row in by_source.items()}
        lines.append("| all quantized | " + " | ".join(f"{quantized[s]:.2f}" for s in sources) + " |"
                     + (f" gap {quantized[pair[0]] - quantized[pair[1]]:+.2f} |" if pair else ""))
        for site, count in first["quantizers"].items():
            # what floating this site regains under each source; the share is the second's minus the first's
            regained = {source: row["sites"][site] - row["quantized"] for source, row in by_source.items()}
            cells = [f"{by_source[s]['sites'][site]:.2f} ({regained[s] + 0.0:+.2f})" for s in sources]
            lines.append(f"| {site} ({count}) | " + " | ".join(cells) + " |" + share(regained))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
