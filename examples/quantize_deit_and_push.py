"""Quantize a Hub DeiT data-free and push it, with a model card and (optionally) its measured accuracy.

Needs network access to the Hugging Face Hub and a write token (`huggingface-cli login` or `HF_TOKEN`). No real
image is used for calibration: the calibration images are synthesized from the float model. Evaluation on
ImageNet (gated: accept its terms on the Hub) is optional and only feeds the card's `model-index`.

Examples:

    python examples/quantize_deit_and_push.py --repo me/deit-s-w4a4-dfq
    python examples/quantize_deit_and_push.py --model facebook/deit-tiny-patch16-224 --bits w4a8 \\
        --synthesizer psaq --repo me/deit-t-w4a8-dfq --eval-limit 5000
    python examples/quantize_deit_and_push.py --model ./local-model --save-dir out/ --no-push   # offline dry run
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/deit-small-patch16-224", help="float model (Hub id or folder)")
    parser.add_argument("--bits", default=None, help="bit preset (default: the recipe's, else w4a4)")
    parser.add_argument("--synthesizer", default=None, help="calibration synthesizer (library default if omitted)")
    parser.add_argument("--recipe", default=None, help="YAML recipe instead of the defaults")
    parser.add_argument("--num-images", type=int, default=None, help="default: the recipe's, else 32")
    parser.add_argument("--repo", default=None, help="Hub repo to push to, e.g. me/deit-s-w4a4-dfq")
    parser.add_argument("--save-dir", default=None, help="also save the quantized model locally")
    parser.add_argument("--no-push", action="store_true", help="do not push (offline dry run)")
    parser.add_argument("--eval-dataset", default="ILSVRC/imagenet-1k", help="for the card's model-index")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--eval-limit", type=int, default=0, help="evaluate on N images before pushing (0: skip)")
    args = parser.parse_args(argv)
    if not args.repo and not args.no_push:  # checked before the synthesis, like --save-dir
        parser.error("pass --repo ORG/NAME to push the quantized model, or --no-push (with --save-dir to keep it).")
    save_dir = Path(args.save_dir).expanduser() if args.save_dir else None
    if save_dir is not None and save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        parser.error(f"--save-dir {args.save_dir} already holds files (or is a file); nothing is overwritten: pass a "
                     "new or empty folder.")

    from optimum_dfq import DataFreeViTQuantizer, DFQConfig
    from optimum_dfq.calibration.data import load_image_dataset
    from optimum_dfq.evaluation import evaluate_accuracy
    from optimum_dfq.hub import accuracy_eval_results

    quantizer = DataFreeViTQuantizer.from_pretrained(args.model)
    config = DFQConfig.from_yaml(args.recipe) if args.recipe else None
    qmodel = quantizer.quantize(bits=args.bits, config=config, synthesizer=args.synthesizer,
                                num_images=args.num_images, save_dir=save_dir)
    print(f"quantized {args.model}: {qmodel.config.quantization_config.bits}, "
          f"synthesizer {qmodel.config.quantization_config.synthesizer}")

    eval_results = None
    if args.eval_limit:
        dataset = load_image_dataset(args.eval_dataset, args.eval_split)
        dataset = dataset.select(range(min(args.eval_limit, len(dataset))))
        accuracy = evaluate_accuracy(qmodel, dataset, quantizer.image_processor)
        print(f"top-1 {100 * accuracy['top1']:.2f}% on {accuracy['num_examples']} images")
        eval_results = accuracy_eval_results(accuracy, dataset_id=args.eval_dataset, split=args.eval_split)

    if args.repo and not args.no_push:
        quantizer.push_to_hub(qmodel, args.repo, eval_results=eval_results, base_model=args.model)
        print(f"pushed to https://huggingface.co/{args.repo}")


if __name__ == "__main__":
    main()
