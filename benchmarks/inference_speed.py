"""CPU latency and file size: FP32 ONNX vs quantized ONNX (QDQ, integer kernels) vs the PyTorch fake-quant model.

Measured side by side in one run, for

* a random ViT-Small-shaped classifier (hidden 384, 12 layers, 6 heads, MLP 1536, 224px, patch 16, 1000 labels):
  W8A8 (8-bit integer weights + QDQ activations; uint8 weights, and int8 with `signed_weights=True`) and W4A8
  (4-bit weights through `MatMulNBits`), at batch 1 and 32;
* each reference model in `examples/models/` (W8A8), plus, with `--accuracy`, top-1 on the CIFAR-10 test split of
  the exported W8A8 model in ONNX Runtime next to the PyTorch quantized model it was exported from.

Latency is the median of `--runs` timed runs after `--warmup` untimed ones, with every engine given the same
threads (`--threads`, default: all cores). Quantization uses a few Gaussian images (speed and size do not depend
on the calibration) and the all-integer activation configuration `INTEGER_ACTIVATIONS` (uniform softmax, calibrated
image input). The engine `w8a8 onnx, default activations` is the same W8A8 model with the library's 8-bit defaults
(TanQ softmax, so Q·Kᵀ's output and A·V run as float ops, and, where the model has an image processor, the
pixel-grid image input): the price of their fidelity in latency. Results go to
`benchmarks/results/inference_speed.{json,md}`.

    python benchmarks/inference_speed.py                  # ViT-Small shape + reference models
    python benchmarks/inference_speed.py --accuracy       # + ONNX Runtime vs PyTorch top-1 on CIFAR-10 test
    python benchmarks/inference_speed.py --skip-vit-small --accuracy --eval-limit 2000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from _report import cpu_description, top1_from_predictions

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results"
LATENCY_TARGET = 0.7  # W8A8 ONNX / FP32 ONNX at batch 32 on the ViT-Small shape
SIZE_TARGET = 0.2  # 4-bit-weight ONNX / FP32 ONNX


def export_float_onnx(model: torch.nn.Module, path: Path) -> None:
    """FP32 ONNX export of a float classifier, with the same exporter and settings as `optimum_dfq.export`."""

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    model.set_attn_implementation("eager")
    config = model.config
    example = torch.zeros(1, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model.eval()), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_latency(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(engines: dict, image_size: int, batches: list[int], args) -> dict:
    """Median latency (seconds) of each engine at each batch size, engines interleaved per batch size."""
    rng = np.random.default_rng(0)
    out: dict = {name: {} for name in engines}
    for batch in batches:
        x = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
        runs = args.runs if batch == 1 else max(3, args.runs // 4)
        for name, engine in engines.items():
            if isinstance(engine, torch.nn.Module):
                pixels = torch.from_numpy(x)

                def fn(engine=engine, pixels=pixels):
                    with torch.inference_mode():
                        engine(pixel_values=pixels)
            else:
                def fn(engine=engine, x=x):
                    engine.run(["logits"], {"pixel_values": x})
            out[name][batch] = median_latency(fn, args.warmup, runs)
    return out


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


#: The all-integer configuration of 8-bit activations: a uniform softmax quantizer and a calibrated per-tensor image
#: input lower to uint8 QDQ, so every matmul (A·V included) can run in integer. The library's defaults at 8 bits
#: (TanQ softmax, pixel-grid input) are more faithful but run those two quantizers, and A·V, as float ops.
INTEGER_ACTIVATIONS = {"post_softmax": "uniform", "input_range": "calibrated"}


DEFAULT_ENGINE = "w8a8 onnx, default activations"
#: The same all-integer W8A8 model with 8-bit weight codes in int8 (`to_onnx(..., signed_weights=True)`): ONNX
#: Runtime's faster uint8 x int8 kernels, exact only on CPUs with VNNI (their int16 pair sums saturate on AVX2).
SIGNED_ENGINE = "w8a8 onnx, signed int8 weights"


def quantize(model, bits: str, images: int, processor=None, integer_activations: bool = True):
    from optimum_dfq import DataFreeViTQuantizer, DFQConfig

    config = DFQConfig(bits=bits, **(INTEGER_ACTIVATIONS if integer_activations else {}))
    return DataFreeViTQuantizer(model, processor).quantize(config=config, synthesizer="gaussian", num_images=images)


def vit_small_rows(args, tmp: Path) -> dict:
    from transformers import ViTConfig, ViTForImageClassification

    from optimum_dfq.export import to_onnx

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, num_labels=1000)
    model = ViTForImageClassification(config).eval()
    fp_path = tmp / "vit_small_fp32.onnx"
    export_float_onnx(model, fp_path)
    result: dict = {"model": "ViT-Small shape (random weights, 224px)", "files": {}, "reports": {}}
    probe = torch.randn(2, 3, 224, 224)
    engines: dict = {"fp32 onnx": ort_session(fp_path, args.threads)}
    result["files"]["fp32 onnx"] = fp_path.stat().st_size
    for bits in ("w8a8", "w4a8"):
        start = time.perf_counter()
        qmodel = quantize(model, bits, args.images)
        print(f"[vit-small] {bits}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
        path = tmp / f"vit_small_{bits}.onnx"
        report = to_onnx(qmodel, path, probe_images=probe)
        print(report.summary(), flush=True)
        result["reports"][bits] = report.to_dict()
        result["files"][f"{bits} onnx"] = path.stat().st_size
        engines[f"{bits} onnx"] = ort_session(path, args.threads)
        if bits == "w8a8":
            qdir = tmp / "vit_small_w8a8_pt"
            qmodel.save_pretrained(qdir)
            result["files"]["w8a8 pytorch (packed safetensors)"] = folder_size(qdir)
            engines["w8a8 pytorch fake-quant"] = qmodel
            signed_path = tmp / "vit_small_w8a8_signed.onnx"
            result["reports"]["w8a8 signed weights"] = to_onnx(qmodel, signed_path, signed_weights=True,
                                                               probe_images=probe).to_dict()
            result["files"][SIGNED_ENGINE] = signed_path.stat().st_size
            engines[SIGNED_ENGINE] = ort_session(signed_path, args.threads)
    path = tmp / "vit_small_w8a8_default.onnx"
    report = to_onnx(quantize(model, "w8a8", args.images, integer_activations=False), path, probe_images=probe)
    result["reports"]["w8a8 default activations"] = report.to_dict()
    result["files"][DEFAULT_ENGINE] = path.stat().st_size
    engines[DEFAULT_ENGINE] = ort_session(path, args.threads)
    with tempfile.TemporaryDirectory() as fp_dir:
        model.save_pretrained(fp_dir)
        result["files"]["fp32 pytorch (safetensors)"] = folder_size(Path(fp_dir))
    engines["fp32 pytorch"] = model
    result["latency_s"] = measure(engines, 224, [1, 32], args)
    lat = result["latency_s"]
    result["latency_ratio_w8a8_vs_fp32_onnx_b32"] = lat["w8a8 onnx"][32] / lat["fp32 onnx"][32]
    result["latency_ratio_w8a8_vs_fp32_onnx_b1"] = lat["w8a8 onnx"][1] / lat["fp32 onnx"][1]
    result["latency_ratio_w8a8_default_vs_fp32_onnx_b32"] = lat[DEFAULT_ENGINE][32] / lat["fp32 onnx"][32]
    result["latency_ratio_w8a8_signed_vs_fp32_onnx_b32"] = lat[SIGNED_ENGINE][32] / lat["fp32 onnx"][32]
    result["size_ratio_w4_vs_fp32_onnx"] = result["files"]["w4a8 onnx"] / result["files"]["fp32 onnx"]
    result["size_ratio_w8_vs_fp32_onnx"] = result["files"]["w8a8 onnx"] / result["files"]["fp32 onnx"]
    return result


def accuracy_onnx(session, pixels: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    predicted = []
    for i in range(0, len(labels), batch):
        predicted += session.run(["logits"], {"pixel_values": pixels[i : i + batch].numpy()})[0].argmax(-1).tolist()
    return top1_from_predictions(predicted, labels.tolist())


def accuracy_torch(model, pixels: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    predicted = []
    with torch.inference_mode():
        for i in range(0, len(labels), batch):
            predicted += model(pixel_values=pixels[i : i + batch]).logits.argmax(-1).tolist()
    return top1_from_predictions(predicted, labels.tolist())


def load_cifar(dataset: str, processor, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from datasets import load_dataset

    data = load_dataset(dataset, split=split)
    if limit:
        data = data.select(range(min(limit, len(data))))
    pixels = processor(images=[im.convert("RGB") for im in data["img"]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(data["label"])


def reference_rows(args, tmp: Path) -> list[dict]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_dfq import DataFreeViTQuantizer, DFQConfig
    from optimum_dfq.calibration import calibration_set_from_dataset
    from optimum_dfq.export import to_onnx

    rows = []
    models = sorted(p for p in (ROOT / "examples" / "models").glob("*-cifar10") if (p / "config.json").exists())
    for folder in models:
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        row: dict = {"model": folder.name, "files": {}}
        fp_path = tmp / f"{folder.name}_fp32.onnx"
        export_float_onnx(model, fp_path)
        if args.accuracy:  # calibrate like the accuracy benchmark's real-data row (train images only)
            from datasets import load_dataset

            train = load_dataset(args.dataset, split="train")
            calibration = calibration_set_from_dataset(train, processor, 32, seed=0)
            qmodel = DataFreeViTQuantizer(model, processor).quantize(
                config=DFQConfig(bits="w8a8", **INTEGER_ACTIVATIONS), calibration_dataset=calibration)
        else:
            qmodel = quantize(model, "w8a8", args.images)
        path = tmp / f"{folder.name}_w8a8.onnx"
        report = to_onnx(qmodel, path)
        row["report"] = report.to_dict()
        default_path = tmp / f"{folder.name}_w8a8_default.onnx"
        to_onnx(quantize(model, "w8a8", args.images, processor, integer_activations=False), default_path)
        row["files"] = {"fp32 onnx": fp_path.stat().st_size, "w8a8 onnx": path.stat().st_size,
                        DEFAULT_ENGINE: default_path.stat().st_size}
        engines = {"fp32 onnx": ort_session(fp_path, args.threads), "w8a8 onnx": ort_session(path, args.threads),
                   DEFAULT_ENGINE: ort_session(default_path, args.threads), "w8a8 pytorch fake-quant": qmodel}
        row["latency_s"] = measure(engines, model.config.image_size, [1, 32], args)
        if args.accuracy:
            pixels, labels = load_cifar(args.dataset, processor, "test", args.eval_limit)
            row["num_test_images"] = len(labels)
            row["top1_pytorch_w8a8"] = accuracy_torch(qmodel, pixels, labels, 250)
            row["top1_onnxruntime_w8a8"] = accuracy_onnx(engines["w8a8 onnx"], pixels, labels, 250)
            row["top1_fp32_onnx"] = accuracy_onnx(engines["fp32 onnx"], pixels, labels, 250)
            print(f"[{folder.name}] top-1 on {len(labels)} test images: PyTorch W8A8 {row['top1_pytorch_w8a8']:.2%}, "
                  f"onnxruntime W8A8 {row['top1_onnxruntime_w8a8']:.2%}, FP32 ONNX {row['top1_fp32_onnx']:.2%}",
                  flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Inference speed and size ({result['machine']}, {result['threads']} threads)", "",
             (f"{result['date']}; optimum_dfq {result['optimum_dfq']}, torch {result['torch']}, "
              f"onnxruntime {result['onnxruntime']}"), "",
             f"Command: `{result['command']}`", ""]
    for row in ([result["vit_small"]] if result.get("vit_small") else []) + result.get("reference", []):
        lines += [f"## {row['model']}", "", "| engine | batch 1 (ms) | batch 32 (ms) | file (MB) |",
                  "|---|---:|---:|---:|"]
        for name, lat in row["latency_s"].items():
            size = next((v for k, v in row["files"].items() if k.startswith(name.split(" fake")[0])), None)
            size_txt = f"{size / 1e6:.2f}" if size else "-"
            lines.append(f"| {name} | {lat[1] * 1e3:.1f} | {lat[32] * 1e3:.1f} | {size_txt} |")
        for name, size in row["files"].items():
            if not any(name.startswith(k.split(" fake")[0]) for k in row["latency_s"]):
                lines.append(f"| {name} (size only) | - | - | {size / 1e6:.2f} |")
        if "top1_onnxruntime_w8a8" in row:
            lines += ["", (f"Top-1 on {row['num_test_images']} CIFAR-10 test images: PyTorch W8A8 "
                           f"{row['top1_pytorch_w8a8']:.2%}, onnxruntime W8A8 {row['top1_onnxruntime_w8a8']:.2%} "
                           f"(difference {abs(row['top1_pytorch_w8a8'] - row['top1_onnxruntime_w8a8']) * 100:.2f} "
                           f"points), FP32 ONNX {row['top1_fp32_onnx']:.2%}.")]
        lines.append("")
    if result.get("vit_small"):
        vs = result["vit_small"]
        lines += [
            "## Targets (ViT-Small shape)", "",
            (f"- W8A8 ONNX / FP32 ONNX latency at batch 32: **{vs['latency_ratio_w8a8_vs_fp32_onnx_b32']:.3f}** "
             f"(target <= {LATENCY_TARGET}); at batch 1: {vs['latency_ratio_w8a8_vs_fp32_onnx_b1']:.3f}; with the "
             f"default 8-bit activations (TanQ, float A·V) at batch 32: "
             f"{vs['latency_ratio_w8a8_default_vs_fp32_onnx_b32']:.3f}"),
            (f"- with signed int8 8-bit weights (`to_onnx(..., signed_weights=True)`, for CPUs with VNNI) at batch 32: "
             f"{vs['latency_ratio_w8a8_signed_vs_fp32_onnx_b32']:.3f}; max |logit difference| against PyTorch on 2 "
             f"probe images on this CPU: {vs['reports']['w8a8 signed weights']['max_abs_logit_diff']:.4f} (default "
             f"uint8 weights: {vs['reports']['w8a8']['max_abs_logit_diff']:.4f})"),
            (f"- 4-bit-weight ONNX / FP32 ONNX file size: **{vs['size_ratio_w4_vs_fp32_onnx']:.3f}** "
             f"(target <= {SIZE_TARGET}); 8-bit: {vs['size_ratio_w8_vs_fp32_onnx']:.3f}"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (a quarter of it at batch 32)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="Gaussian calibration images for speed-only models")
    parser.add_argument("--skip-vit-small", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="top-1 of ONNX Runtime vs PyTorch on CIFAR-10 test")
    parser.add_argument("--dataset", default=str(CIFAR),
                        help="CIFAR-10 datasets folder with train and test splits (default: ../shared/data/cifar10)")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N test images only (default: all)")
    parser.add_argument("--output", default=str(RESULTS / "inference_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sys

    from optimum_dfq import __version__

    result: dict = {"command": "python benchmarks/inference_speed.py " + " ".join(sys.argv[1:]),
                    "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                    "machine": cpu_description(),
                    "threads": args.threads, "optimum_dfq": __version__, "torch": torch.__version__}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_vit_small:
            result["vit_small"] = vit_small_rows(args, Path(tmp))
        if not args.skip_reference:
            result["reference"] = reference_rows(args, Path(tmp))
    result["seconds"] = time.perf_counter() - start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    output.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
