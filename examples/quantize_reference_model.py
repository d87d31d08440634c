"""The main job, offline: quantize the bundled CIFAR-10 reference ViT without data and measure what it costs.

Loads the small reference model shipped in `examples/models/`, quantizes it data-free at each requested bit
preset (calibration images are synthesized from the model; no real image is used), and prints the top-1 accuracy
of the float and quantized models on real CIFAR-10 *test* images kept in `examples/data/` (never used for
calibration).

Example:

    python examples/quantize_reference_model.py
    python examples/quantize_reference_model.py --bits w8a8 w4a8 w4a4 --synthesizer gaussian --num-images 32

The first preset pays for the synthesis (a few minutes on a 2-core CPU with the default `dfq-vit` synthesizer);
the others reuse the same calibration set from the synthesis cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).parent
DEFAULT_MODEL = HERE / "models" / "vit-cifar10"
DEFAULT_EVAL = HERE / "data" / "cifar10_test_500.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="float model folder or Hub id")
    parser.add_argument("--eval-data", default=str(DEFAULT_EVAL), help="parquet file of labelled test images")
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a4"], help="bit presets to run")
    parser.add_argument("--synthesizer", default=None, help="calibration synthesizer (library default if omitted)")
    parser.add_argument("--num-images", type=int, default=None, help="number of synthetic calibration images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--cache-dir", default=None, help="keep the synthesized calibration set here, so that a "
                        "second run reuses it (default: a temporary folder, shared by the bit presets of this run)")
    args = parser.parse_args()
    if args.output and Path(args.output).is_dir():  # checked before the minutes of synthesis, like --bits below
        parser.error(f"--output {args.output} is a folder; pass a file name, e.g. {Path(args.output) / 'rows.json'}.")

    import torch
    from datasets import load_dataset

    from optimum_dfq import DataFreeViTQuantizer, DFQConfig, get_synthesizer
    from optimum_dfq.config import parse_bits
    from optimum_dfq.errors import DFQError
    from optimum_dfq.evaluation import evaluate_accuracy

    for bits in args.bits:  # checked before the float evaluation and the synthesis
        try:
            parse_bits(bits)
        except DFQError as err:
            parser.error(str(err))
    if args.num_images is not None and args.num_images < 1:
        parser.error(f"--num-images {args.num_images} must be at least 1 (default 32).")
    args.synthesizer = args.synthesizer or DFQConfig().synthesizer
    try:
        caches = get_synthesizer(args.synthesizer).accepts("cache_dir")
    except DFQError as err:
        parser.error(str(err))

    torch.manual_seed(args.seed)
    quantizer = DataFreeViTQuantizer.from_pretrained(args.model)
    model = quantizer.model.float().eval()
    dataset = load_dataset("parquet", data_files={"test": args.eval_data}, split="test")
    print(f"model: {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    default_data = Path(args.eval_data).resolve() == DEFAULT_EVAL.resolve()
    images = "real CIFAR-10 test images" if default_data else "labelled images"  # the user's set may be anything
    print(f"evaluation: {len(dataset)} {images} from {args.eval_data} (never used for calibration)")

    fp = evaluate_accuracy(model, dataset, quantizer.image_processor, progress=False)
    rows = [{"model": "float32", "top1": fp["top1"], "seconds": 0.0}]
    print(f"{'float32':>8}  top-1 {100 * fp['top1']:6.2f}%")
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = (args.cache_dir or scratch) if caches else None  # noise needs no cache (and refuses one)
        for bits in args.bits:
            rows.append(quantize_and_evaluate(quantizer, model, dataset, bits, args, cache_dir))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=2))


def quantize_and_evaluate(quantizer, model, dataset, bits: str, args, cache_dir: str | None) -> dict:
    """One bit preset: quantize data-free (the first preset synthesizes, the others reuse the set) and evaluate."""
    from optimum_dfq.evaluation import evaluate_accuracy

    start = time.perf_counter()
    qmodel = quantizer.quantize(model, bits=bits, synthesizer=args.synthesizer, num_images=args.num_images,
                                seed=args.seed, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    result = evaluate_accuracy(qmodel, dataset, quantizer.image_processor, progress=False)
    config = qmodel.config.quantization_config
    print(f"{bits:>8}  top-1 {100 * result['top1']:6.2f}%   (data-free: {config.num_images} images from "
          f"'{config.synthesizer}', quantized in {seconds:.1f} s)", flush=True)
    return {"model": bits, "top1": result["top1"], "seconds": seconds, "synthesizer": config.synthesizer,
            "num_images": config.num_images}


if __name__ == "__main__":
    main()
