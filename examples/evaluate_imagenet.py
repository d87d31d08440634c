"""Evaluate a float or quantized model on ImageNet-1k validation (for users with Hub access).

`ILSVRC/imagenet-1k` is gated: accept its terms on the Hub and log in (`huggingface-cli login`) or set `HF_TOKEN`.
Images go through the model's own image processor (resize, centre crop, mean/std from its
`preprocessor_config.json`), and top-1/top-5 are computed from the logits against the integer labels (ImageNet's
duplicate class names, e.g. the two "crane" classes, would corrupt a string-label evaluator).

Examples:

    # a quantized checkpoint saved by optimum_dfq (import registers the quantization method)
    python examples/evaluate_imagenet.py me/deit-s-w4a4-dfq --limit 5000
    # offline check of the same code path on a local sample (one image per class)
    python examples/evaluate_imagenet.py ./tiny-model --dataset ../shared/data/imagenet-1k-sample --limit 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--dataset", default="ILSVRC/imagenet-1k", help="Hub id or local dataset folder")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.output and Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a folder; pass a file name, e.g. {Path(args.output) / 'top1.json'}.")

    import optimum_dfq  # noqa: F401  (registers the quantization method for quantized checkpoints)
    from optimum_dfq import DataFreeViTQuantizer
    from optimum_dfq.calibration.data import load_image_dataset
    from optimum_dfq.evaluation import evaluate_accuracy

    quantizer = DataFreeViTQuantizer.from_pretrained(args.model)
    dataset = load_image_dataset(args.dataset, args.split)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    results = evaluate_accuracy(quantizer.model, dataset, quantizer.image_processor, batch_size=args.batch_size)
    results.update({"model": args.model, "dataset": args.dataset, "split": args.split})
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
