#!/usr/bin/env python
# Copyright 2025 The optimum-dfq authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Train a small 🤗 Transformers vision model from scratch on CIFAR-10 (or any `datasets` image-classification
dataset) on CPU, to serve as a full-precision reference model for data-free quantization experiments.

Supported architectures (`--arch`):

- `vit`: [`ViTForImageClassification`] (image 32, patch 4).
- `deit`: [`DeiTForImageClassificationWithTeacher`] (image 32, patch 4), trained with a distillation head whose
  target is the hard label, or a teacher's predictions when `--teacher DIR` is given.
- `swin`: [`SwinForImageClassification`] (image 32, patch 2, window 4).

The whole dataset is decoded once into a `uint8` tensor `[N, 3, H, W]`; augmentation (random crop with 4-px zero
padding, horizontal flip, optional mixup/cutmix) and normalisation run in torch. The normalisation is bit-identical
to the [`ViTImageProcessor`] that is saved with the model (checked at start-up).

Training is resumable: every `--save-steps` optimizer steps, at every epoch end, on `SIGTERM`/`SIGINT` and when
`--max-minutes` is reached, a checkpoint (model, optimizer, scheduler, RNG states, progress) is written atomically to
`<output-dir>/checkpoint/` as safetensors + json (no pickle). `--resume` continues exactly where it stopped.

At every new best end-of-epoch test accuracy and at the end of training, the model is exported to `<output-dir>` with
`save_pretrained` as fp16 safetensors, together with the image processor and a model card whose test top-1 is
measured on the full test split with the fp16 weights loaded back in fp32.

Example:

```bash
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/train_reference_model.py \\
    --arch vit --output-dir examples/models/vit-cifar10 --epochs 20 --threads 1 --max-minutes 140

# later, continue exactly where it stopped (hyperparameters are read back from the checkpoint):
python examples/train_reference_model.py --output-dir examples/models/vit-cifar10 --resume --threads 1
```
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
CHECKPOINT_DIRNAME = "checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Options that define the training run. On `--resume` they are read back from the checkpoint; the other options
# (output dir, threads, time/step limits, checkpoint interval, eval batch size) may change between sessions.
# fmt: off
HYPERPARAMETERS = (
    "arch", "dataset", "image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio",
    "embed_dim", "depths", "swin_heads", "window_size", "dropout", "drop_path", "epochs", "batch_size", "lr",
    "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob",
    "no_flip", "crop_padding", "teacher", "distillation_type", "distillation_tau", "seed",
)
# fmt: on


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Command-line interface. Architecture-size options left to `None` take per-architecture defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=["vit", "deit", "swin"], default="vit")
    p.add_argument(
        "--dataset", default="../shared/data/cifar10", help="`datasets` path or name (relative to cwd or repo root)"
    )
    p.add_argument("--output-dir", required=True)
    # model size
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None, help="default: 4 (vit/deit), 2 (swin)")
    p.add_argument("--hidden-size", type=int, default=128, help="vit/deit")
    p.add_argument("--num-layers", type=int, default=6, help="vit/deit")
    p.add_argument("--num-heads", type=int, default=4, help="vit/deit")
    p.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden size / embedding size")
    p.add_argument("--embed-dim", type=int, default=48, help="swin")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2], help="swin")
    p.add_argument("--swin-heads", type=int, nargs="+", default=[3, 6, 12], help="swin")
    p.add_argument("--window-size", type=int, default=4, help="swin")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--drop-path", type=float, default=0.0, help="swin stochastic depth")
    # optimisation
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    # augmentation
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="0 disables mixup")
    p.add_argument("--cutmix-alpha", type=float, default=0.0, help="0 disables cutmix")
    p.add_argument("--mix-prob", type=float, default=1.0, help="probability to apply mixup/cutmix to a batch")
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--crop-padding", type=int, default=4, help="0 disables random crops")
    # distillation (deit)
    p.add_argument("--teacher", default=None, help="deit: directory of a trained image classifier used as teacher")
    p.add_argument("--distillation-type", choices=["hard", "soft"], default="hard")
    p.add_argument("--distillation-tau", type=float, default=1.0)
    # runtime
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop (with a resumable checkpoint) after this wall time"
    )
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop (with a resumable checkpoint) after N steps in this session"
    )
    p.add_argument("--save-steps", type=int, default=100, help="checkpoint every N optimizer steps")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint")
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the architecture-dependent defaults."""
    if args.patch_size is None:
        args.patch_size = 2 if args.arch == "swin" else 4
    if args.teacher is not None and args.arch != "deit":
        raise ValueError("--teacher is only used with --arch deit")
    return args


def check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse counts and rates that would fail later (`--eval-batch-size` only after a whole epoch) or do nothing."""
    for key in ("epochs", "batch_size", "eval_batch_size", "save_steps", "threads", "lr", "max_steps", "max_minutes"):
        value, default = getattr(args, key), parser.get_default(key)
        if value is not None and value <= 0:
            fix = f"the default is {default:g}" if default is not None else "leave it out for no limit"
            raise ValueError(f"--{key.replace('_', '-')} {value:g} must be positive ({fix}).")


def merge_resumed_args(cli: argparse.Namespace, saved: dict[str, Any], explicit: set[str]) -> argparse.Namespace:
    """On resume, take the hyperparameters from the checkpoint; refuse explicit CLI values that contradict them.

    `explicit` names the options given on the command line (even when equal to their default), so that e.g.
    `--epochs 20` extends a 12-epoch run although 20 is the default.
    """
    merged = copy.copy(cli)
    for key in HYPERPARAMETERS:
        cli_value, saved_value = getattr(cli, key), saved[key]
        if key in explicit and cli_value != saved_value:
            if key == "epochs":
                print(f"[resume] epochs {saved_value} -> {cli_value}: the cosine schedule is stretched from here on")
                continue
            raise ValueError(f"--{key.replace('_', '-')}={cli_value} contradicts the checkpoint ({saved_value})")
        setattr(merged, key, saved_value)
    return merged


def explicit_options(argv: list[str] | None) -> set[str]:
    """Destinations of the options actually given on the command line."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def reproduce_command(args: argparse.Namespace) -> str:
    """A command line that reproduces this run from scratch (all hyperparameters explicit)."""
    parts = ["python", "examples/train_reference_model.py", "--output-dir", args.output_dir]
    skip = (
        {"hidden_size", "num_layers", "num_heads"}
        if args.arch == "swin"
        else {"embed_dim", "depths", "swin_heads", "window_size", "drop_path"}
    )
    if args.arch != "deit" or args.teacher is None:
        skip |= {"distillation_type", "distillation_tau"}
    for key in HYPERPARAMETERS + ("threads",):
        if key in skip:
            continue
        value = getattr(args, key)
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif value is None:
            continue
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " + shlex.join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """A dataset decoded into memory: uint8 images `[N, 3, H, W]` and int64 labels `[N]`."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    label_names: list[str]
    test_pil_samples: list[Any] = field(default_factory=list)


def resolve_dataset_path(dataset: str) -> str:
    """Resolve a local dataset path relative to the cwd, then to the repository root; else keep it as a hub name."""
    for candidate in (Path(dataset), REPO_ROOT / dataset):
        if candidate.exists():
            return str(candidate.resolve())
    return dataset


def find_columns(features: Any) -> tuple[str, str]:
    """Names of the image (`Image`) and label (`ClassLabel`) columns."""
    from datasets import ClassLabel, Image

    image_cols = [k for k, v in features.items() if isinstance(v, Image)]
    label_cols = [k for k, v in features.items() if isinstance(v, ClassLabel)]
    if not image_cols or not label_cols:
        raise ValueError(f"need an Image and a ClassLabel column, got {features}")
    return image_cols[0], label_cols[0]


def decode_split(
    split: Any, image_col: str, label_col: str, image_size: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode all images of a split to a uint8 tensor `[N, 3, S, S]` (RGB; bilinear resize only if needed)."""
    from PIL import Image

    images = np.empty((len(split), image_size, image_size, 3), dtype=np.uint8)
    i = 0
    for batch in tqdm(split.iter(batch_size=1000), total=math.ceil(len(split) / 1000), desc=desc, leave=False):
        for im in batch[image_col]:
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            images[i] = np.asarray(im)
            i += 1
    labels = torch.tensor(split[label_col], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def load_image_data(dataset: str, image_size: int) -> ImageData:
    """Load the train and test splits of an image-classification dataset into memory."""
    from datasets import load_dataset

    ds = load_dataset(resolve_dataset_path(dataset))
    if "train" not in ds or "test" not in ds:
        raise ValueError(f"dataset needs 'train' and 'test' splits, got {list(ds)}")
    image_col, label_col = find_columns(ds["train"].features)
    train_x, train_y = decode_split(ds["train"], image_col, label_col, image_size, "decoding train")
    test_x, test_y = decode_split(ds["test"], image_col, label_col, image_size, "decoding test")
    samples = [ds["test"][i][image_col].convert("RGB") for i in range(8)]
    names = list(ds["train"].features[label_col].names)
    return ImageData(train_x, train_y, test_x, test_y, names, samples)


def build_image_processor(image_size: int) -> Any:
    """The image processor saved with the model (CIFAR-10 mean/std; a no-op resize for 32x32 inputs).

    Built with the PIL/NumPy backend, the one [`Normalizer`] matches bit for bit, also where torchvision is installed
    (`ViTImageProcessor` then means the torchvision backend). Saved, it is a `ViTImageProcessor` either way.
    """
    try:
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:  # transformers before the PIL/torchvision backend split: ViTImageProcessor is the PIL one
        from transformers import ViTImageProcessor as processor_class

    return processor_class(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=CIFAR10_MEAN,
        image_std=CIFAR10_STD,
    )


class Normalizer:
    """uint8 -> float32 normalisation, bit-identical to the PIL/NumPy backend of `ViTImageProcessor`.

    That backend computes `float32(float64(x) * rescale_factor)`, then `(x - float32(mean)) / float32(std)` in
    float32. With only 256 input values per channel this is tabulated once and applied with a gather.
    """

    def __init__(self, processor: Any) -> None:
        rescaled = torch.from_numpy((np.arange(256, dtype=np.float64) * processor.rescale_factor).astype(np.float32))
        mean = torch.tensor(processor.image_mean, dtype=torch.float32)
        std = torch.tensor(processor.image_std, dtype=torch.float32)
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self.lut = ((rescaled[None, :] - mean[:, None]) / std[:, None]).reshape(-1)  # [3 * 256]
        self.offsets = (torch.arange(3, dtype=torch.int64) * 256).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.lut[images.to(torch.int64) + self.offsets]


def check_normalization(processor: Any, normalizer: Normalizer, pil_images: list[Any], image_size: int) -> float:
    """Compare the saved image processor with the training-time torch normalisation; return the max abs diff."""
    from PIL import Image

    expected = processor(pil_images, return_tensors="pt")["pixel_values"]
    arrays = []
    for im in pil_images:
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        arrays.append(np.asarray(im))
    ours = normalizer(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    diff = (expected - ours).abs().max().item()
    if expected.shape != ours.shape or diff > 1e-6:
        raise RuntimeError(f"train-time normalisation differs from the image processor (max abs diff {diff})")
    return diff


def augment(images: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip on a uint8 batch `[B, 3, H, W]`."""
    b, c, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        images = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        do_flip = torch.rand(b, generator=generator) < 0.5
        images = torch.where(do_flip[:, None, None, None], images.flip(-1), images)
    return images


def mix_batch(
    pixels: torch.Tensor,
    targets: torch.Tensor,
    args: argparse.Namespace,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optionally apply mixup or cutmix to a normalised batch with one-hot (or smoothed) targets."""
    use_mixup, use_cutmix = args.mixup_alpha > 0, args.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= args.mix_prob:
        return pixels, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < 0.5)
    lam = float(
        rng.beta(args.cutmix_alpha, args.cutmix_alpha) if cutmix else rng.beta(args.mixup_alpha, args.mixup_alpha)
    )
    perm = torch.randperm(pixels.shape[0], generator=generator)
    if cutmix:
        h, w = pixels.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        pixels = pixels.clone()
        pixels[:, :, y0:y1, x0:x1] = pixels[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        pixels = lam * pixels + (1 - lam) * pixels[perm]
    return pixels, lam * targets + (1 - lam) * targets[perm]


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, label_names: list[str]) -> torch.nn.Module:
    """Instantiate a randomly initialised classifier for `args.arch`."""
    from transformers import (
        DeiTConfig,
        DeiTForImageClassificationWithTeacher,
        SwinConfig,
        SwinForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    if args.arch == "swin":
        config = SwinConfig(
            image_size=args.image_size,
            patch_size=args.patch_size,
            num_channels=3,
            embed_dim=args.embed_dim,
            depths=args.depths,
            num_heads=args.swin_heads,
            window_size=args.window_size,
            mlp_ratio=args.mlp_ratio,
            hidden_dropout_prob=args.dropout,
            attention_probs_dropout_prob=args.dropout,
            drop_path_rate=args.drop_path,
            **labels,
        )
        return SwinForImageClassification(config)
    config_cls, model_cls = (ViTConfig, ViTForImageClassification)
    if args.arch == "deit":
        config_cls, model_cls = (DeiTConfig, DeiTForImageClassificationWithTeacher)
    config = config_cls(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=int(args.hidden_size * args.mlp_ratio),
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        **labels,
    )
    return model_cls(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Teacher:
    """A frozen image classifier whose predictions are the distillation targets of a DeiT student."""

    def __init__(self, path: str, student_normalizer: Normalizer) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(path)
        self.size = (processor.size["height"], processor.size["width"])
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.student_mean, self.student_std = student_normalizer.mean, student_normalizer.std

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = pixels * self.student_std + self.student_mean  # back to [0, 1]
        if tuple(raw.shape[-2:]) != self.size:
            raw = F.interpolate(raw, size=self.size, mode="bilinear", align_corners=False)
        return self.model(pixel_values=(raw - self.mean) / self.std).logits


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def compute_loss(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    args: argparse.Namespace,
    teacher: Teacher | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss and the logits used for the training accuracy."""
    outputs = model(pixel_values=pixels)
    if args.arch != "deit":
        return soft_cross_entropy(outputs.logits, targets), outputs.logits
    cls_loss = soft_cross_entropy(outputs.cls_logits, targets)
    if teacher is None:  # the distillation head also learns the (smoothed / mixed) labels
        dist_loss = soft_cross_entropy(outputs.distillation_logits, targets)
    elif args.distillation_type == "hard":
        dist_loss = F.cross_entropy(outputs.distillation_logits, teacher(pixels).argmax(-1))
    else:
        tau = args.distillation_tau
        dist_loss = F.kl_div(
            F.log_softmax(outputs.distillation_logits / tau, -1),
            F.log_softmax(teacher(pixels) / tau, -1),
            reduction="batchmean",
            log_target=True,
        ) * (tau * tau)
    return 0.5 * cls_loss + 0.5 * dist_loss, outputs.logits


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, batch_size: int
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on a (test) split, no augmentation."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, images.shape[0], batch_size):
        logits = model(pixel_values=normalizer(images[start : start + batch_size])).logits.float()
        y = labels[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train(was_training)
    return {"accuracy": correct / images.shape[0], "loss": loss_sum / images.shape[0]}


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------------
NO_DECAY_KEYS = ("position_embeddings", "cls_token", "distillation_token", "mask_token", "relative_position_bias_table")


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or any(k in name for k in NO_DECAY_KEYS) else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to `min_lr`."""
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    floor = args.min_lr / args.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpointing (safetensors + json only)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Progress of a run. `step_in_epoch` batches of `epoch` are done; sums accumulate the epoch's train metrics."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_test_accuracy: float = -1.0
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into named tensors and a json-able structure."""
    state_dict = optimizer.state_dict()
    tensors, structure = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, param_state in state_dict["state"].items():
        entry = {}
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous()
                entry[key] = {"tensor": f"state.{idx}.{key}"}
            else:
                entry[key] = {"value": value}
        structure["state"][str(idx)] = entry
    return tensors, structure


def unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`."""
    groups = []
    for group in structure["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    state = {
        int(idx): {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
        for idx, entry in structure["state"].items()
    }
    return {"state": state, "param_groups": groups}


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    generator: torch.Generator,
    np_rng: np.random.Generator,
    args: argparse.Namespace,
) -> None:
    """Write `<output_dir>/checkpoint` atomically: build `checkpoint.tmp`, then swap directories with `os.replace`."""
    final, tmp, old = (output_dir / f"{CHECKPOINT_DIRNAME}{s}" for s in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors, opt_structure = flatten_optimizer(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "optimizer.json", opt_structure)
    save_file({"torch": torch.get_rng_state(), "augment": generator.get_state()}, tmp / "rng_state.safetensors")
    hyper = {k: getattr(args, k) for k in HYPERPARAMETERS}
    trainer_state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "train_state": state.__dict__,
        "scheduler": scheduler.state_dict(),  # LambdaLR: plain numbers (a function lambda is stored as null)
        "numpy_rng": np_rng.bit_generator.state,
        "args": hyper,
    }
    write_json(tmp / "trainer_state.json", trainer_state)  # written last: marks a complete checkpoint
    for f in tmp.iterdir():
        f.chmod(0o644)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output_dir: Path) -> Path | None:
    """The latest complete checkpoint (`checkpoint/`, or `checkpoint.old/` if a swap was interrupted)."""
    for name in (CHECKPOINT_DIRNAME, f"{CHECKPOINT_DIRNAME}.old"):
        if (output_dir / name / "trainer_state.json").exists():
            return output_dir / name
    return None


def read_checkpoint_args(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())["args"]


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    np_rng: np.random.Generator,
) -> TrainState:
    """Restore everything written by `save_checkpoint`; return the progress."""
    meta = json.loads((path / "trainer_state.json").read_text())
    if meta["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {meta['format_version']}")
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    opt_structure = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(unflatten_optimizer(load_file(path / "optimizer.safetensors"), opt_structure))
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(path / "rng_state.safetensors")
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["augment"])
    np_rng.bit_generator.state = meta["numpy_rng"]
    return TrainState(**meta["train_state"])


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------
def export_model(
    model: torch.nn.Module,
    processor: Any,
    data: ImageData,
    normalizer: Normalizer,
    args: argparse.Namespace,
    state: TrainState,
    epoch_metrics: dict[str, float],
    final: bool,
) -> float:
    """Save fp16 weights + image processor, reload them in fp32, measure test top-1 and write the model card."""
    from transformers import AutoImageProcessor

    output_dir = Path(args.output_dir)
    half = copy.deepcopy(model).half().eval()
    half.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    del half
    for f in output_dir.glob("*.safetensors"):
        f.chmod(0o644)
    reloaded = type(model).from_pretrained(output_dir, dtype=torch.float32).eval()
    check_normalization(
        AutoImageProcessor.from_pretrained(output_dir), normalizer, data.test_pil_samples, args.image_size
    )
    metrics = evaluate(reloaded, data.test_images, data.test_labels, normalizer, args.eval_batch_size)
    results = {
        "test_top1": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "test_top1_fp32_training_weights": epoch_metrics["test_accuracy"],
        "epoch": state.epoch,
        "epochs_scheduled": args.epochs,
        "global_step": state.global_step,
        "train_complete": final,
        "num_parameters": count_parameters(model),
        "weights_dtype": "float16 (evaluated after loading in float32)",
        "test_examples": int(data.test_labels.numel()),
        "train_examples": int(data.train_labels.numel()),
    }
    write_json(output_dir / "eval_results.json", results)
    (output_dir / "README.md").write_text(model_card(args, results, model))
    return metrics["accuracy"]


def schedule_history(log_path: Path) -> str:
    """Where the run was extended with `--resume --epochs N` (the learning rate rises again), read from its log."""
    if not log_path.exists():
        return ""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    restarts = [(now["epoch"], before["lr"], now["lr"], before["test_accuracy"])
                for before, now in itertools.pairwise(records) if now["lr"] > 1.05 * before["lr"] and now["epoch"] > 2]
    if not restarts:
        return ""
    lines = ["", "**Training history.** The command above reproduces the hyper-parameters, not this exact run: it was",
             "extended from its checkpoint with `--resume --epochs N`, which stretches the cosine schedule from that",
             "point on (the learning rate rises again):", ""]
    lines += [f"- from epoch {epoch}: lr {low:.2g} at the end of epoch {epoch - 1}, {high:.2g} at the end of epoch "
              f"{epoch} (test top-1 after epoch {epoch - 1}: {100 * acc:.2f}%)" for epoch, low, high, acc in restarts]
    return "\n".join(lines) + "\n"


def model_card(args: argparse.Namespace, results: dict[str, Any], model: torch.nn.Module) -> str:
    """Markdown model card with Hub-style metadata."""
    cfg = model.config
    arch_name = type(model).__name__
    if args.arch == "swin":
        size = (
            f"embed_dim {cfg.embed_dim}, depths {list(cfg.depths)}, heads {list(cfg.num_heads)}, "
            f"window {cfg.window_size}, patch {cfg.patch_size}, mlp ratio {cfg.mlp_ratio:g}"
        )
    else:
        size = (
            f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
            f"MLP {cfg.intermediate_size}, patch {cfg.patch_size}"
        )
    crop = f"random crop {args.image_size}x{args.image_size} with {args.crop_padding}-px zero padding"
    aug = [crop] if args.crop_padding else []
    aug += [] if args.no_flip else ["random horizontal flip"]
    aug += [f"mixup (alpha {args.mixup_alpha:g})"] if args.mixup_alpha > 0 else []
    aug += [f"cutmix (alpha {args.cutmix_alpha:g})"] if args.cutmix_alpha > 0 else []
    if (args.mixup_alpha > 0 or args.cutmix_alpha > 0) and args.mix_prob < 1:
        aug[-1] += f", applied with probability {args.mix_prob:g}"
    distill = ""
    if args.arch == "deit":
        target = "the labels (no teacher)"
        if args.teacher is not None:
            target = f"{args.distillation_type} predictions of the teacher `{args.teacher}`"
        distill = f"- Distillation head: target = {target}; loss = 0.5 * CE(cls head) + 0.5 * distillation loss.\n"
    status = (
        "complete"
        if results["train_complete"]
        else f"in progress: best end-of-epoch model so far, after epoch {results['epoch']} of "
        f"{results['epochs_scheduled']} (resume with `--resume`)"
    )
    acc = 100 * results["test_top1"]
    dataset_id = Path(args.dataset).name  # a folder's name or a Hub id's last part
    dataset_name = "CIFAR-10" if dataset_id == "cifar10" else dataset_id
    return f"""---
library_name: transformers
pipeline_tag: image-classification
license: apache-2.0
datasets:
- {dataset_id}
metrics:
- accuracy
tags:
- image-classification
- vision
- {args.arch}
- {dataset_id}
- optimum-dfq
model-index:
- name: {Path(args.output_dir).name}
  results:
  - task:
      type: image-classification
    dataset:
      name: {dataset_name}
      type: {dataset_id}
      split: test
    metrics:
    - type: accuracy
      value: {results["test_top1"]:.4f}
      name: top-1 accuracy
---

# {Path(args.output_dir).name}

A small `{arch_name}` trained **from scratch** on {dataset_name} (train split only) on CPU with
`examples/train_reference_model.py` of `optimum-dfq`. It is a full-precision reference model for data-free
quantization experiments, not a state-of-the-art classifier.

## Results

| split | examples | top-1 |
|---|---|---|
| {dataset_name} test | {results["test_examples"]} | **{acc:.2f}%** |

Measured on the full test split with the fp16 weights of this repository loaded back in fp32
(`dtype=torch.float32`), preprocessed by the saved image processor. Training status: {status}.
Checkpoint epoch {results["epoch"]}, optimizer step {results["global_step"]}.

## Model

- Architecture: `{arch_name}`, image {args.image_size}x{args.image_size}, {size}, dropout {args.dropout:g}.
- Parameters: {results["num_parameters"]:,} ({results["num_parameters"] / 1e6:.2f} M), stored as float16 safetensors.
- Preprocessing: `ViTImageProcessor` (resize to {args.image_size}x{args.image_size}, rescale 1/255, normalise with the
  CIFAR-10 channel mean {CIFAR10_MEAN} and std {CIFAR10_STD}).

## Training recipe

- Data: `{args.dataset}` train split ({results["train_examples"]:,} images); the test split is used for evaluation only.
- {args.epochs} epochs, batch size {args.batch_size} (last incomplete batch of each epoch dropped).
- AdamW (betas 0.9/0.999), lr {args.lr:g}, weight decay {args.weight_decay:g} (none on biases, norms, tokens and
  position embeddings), {args.warmup_epochs:g} warm-up epochs then per-step cosine decay to {args.min_lr:g}.
- Cross-entropy with label smoothing {args.label_smoothing:g}.
- Augmentation: {", ".join(aug) if aug else "none"}.
{distill}- fp32 on CPU, `torch.set_num_threads({args.threads})`, seed {args.seed}.

## Reproduce

```bash
{reproduce_command(args)}
```

The run may be split over several sessions with `--max-minutes` and continued with
`--output-dir {args.output_dir} --resume`; resuming restores model, optimizer, scheduler and RNG states exactly.
{schedule_history(Path(args.output_dir) / "train_log.jsonl")}
## Usage

```python
import torch
from transformers import AutoImageProcessor, {arch_name}

processor = AutoImageProcessor.from_pretrained("{args.output_dir}")
model = {arch_name}.from_pretrained("{args.output_dir}", dtype=torch.float32).eval()
inputs = processor(images, return_tensors="pt")
predictions = model(**inputs).logits.argmax(-1)
```
"""


# ----------------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------------
class StopRequest:
    """Set by SIGTERM/SIGINT so that the loop can write a checkpoint before exiting."""

    def __init__(self) -> None:
        self.signal: int | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffling of an epoch depends only on (seed, epoch), so a resumed epoch replays the same order."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def make_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(args: argparse.Namespace, start_time: float) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    data = load_image_data(args.dataset, args.image_size)
    processor = build_image_processor(args.image_size)
    normalizer = Normalizer(processor)
    diff = check_normalization(processor, normalizer, data.test_pil_samples, args.image_size)
    print(
        f"[check] image processor vs. torch normalisation on {len(data.test_pil_samples)} test images: "
        f"max |diff| = {diff:g}"
    )

    torch.manual_seed(args.seed)
    model = build_model(args, data.label_names)
    optimizer = build_optimizer(model, args)
    steps_per_epoch = data.train_images.shape[0] // args.batch_size
    if steps_per_epoch == 0:  # the last incomplete batch is dropped: no step at all
        raise ValueError(f"--batch-size {args.batch_size} is larger than the train split "
                         f"({data.train_images.shape[0]} images); pass a smaller --batch-size.")
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed + 1)
    np_rng = np.random.default_rng(args.seed + 2)
    teacher = Teacher(args.teacher, normalizer) if args.teacher else None
    num_classes = len(data.label_names)

    state = TrainState()
    checkpoint = find_checkpoint(output_dir) if args.resume else None  # main() checked it exists, or is absent
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, generator, np_rng)
        print(
            f"[resume] {checkpoint}: epoch {state.epoch}, step {state.step_in_epoch}/{steps_per_epoch}, "
            f"global step {state.global_step}"
        )
    print(
        f"[model] {type(model).__name__}: {count_parameters(model):,} parameters; {steps_per_epoch} steps/epoch, "
        f"{args.epochs} epochs, {torch.get_num_threads()} thread(s)"
    )

    stop = StopRequest()
    deadline = start_time + 60 * args.max_minutes if args.max_minutes else math.inf
    log_path = output_dir / "train_log.jsonl"
    non_tty = not sys.stderr.isatty()

    def checkpoint_now() -> None:
        save_checkpoint(output_dir, model, optimizer, scheduler, state, generator, np_rng, args)

    model.train()
    session_steps, out_of_time = 0, False
    while state.epoch < args.epochs:
        order = epoch_order(data.train_images.shape[0], args.seed, state.epoch)
        bar = tqdm(
            range(state.step_in_epoch, steps_per_epoch),
            initial=state.step_in_epoch,
            total=steps_per_epoch,
            desc=f"epoch {state.epoch + 1}/{args.epochs}",
            mininterval=30 if non_tty else 0.5,
            dynamic_ncols=True,
        )
        for step in bar:
            t0 = time.perf_counter()
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = augment(data.train_images[idx], generator, args.crop_padding, not args.no_flip)
            labels = data.train_labels[idx]
            pixels, targets = mix_batch(
                normalizer(images), make_targets(labels, num_classes, args.label_smoothing), args, np_rng, generator
            )
            loss, logits = compute_loss(model, pixels, targets, args, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
            state.epoch_loss_sum += loss.item() * labels.numel()
            state.epoch_correct += (logits.argmax(-1) == targets.argmax(-1)).sum().item()
            state.epoch_seen += labels.numel()
            dt = time.perf_counter() - t0
            state.epoch_seconds += dt
            state.train_seconds += dt
            bar.set_postfix(
                loss=f"{state.epoch_loss_sum / state.epoch_seen:.3f}",
                acc=f"{state.epoch_correct / state.epoch_seen:.3f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
                s_step=f"{dt:.2f}",
                refresh=False,
            )

            session_steps += 1
            out_of_time = time.time() >= deadline or (args.max_steps is not None and session_steps >= args.max_steps)
            if stop.signal is not None or out_of_time:
                bar.close()
                if state.step_in_epoch < steps_per_epoch:
                    checkpoint_now()
                    why = f"signal {stop.signal}" if stop.signal is not None else "time/step limit"
                    print(
                        f"[stop] {why}: checkpoint at epoch {state.epoch}, step {state.step_in_epoch}/"
                        f"{steps_per_epoch} (global {state.global_step}). Resume with --resume."
                    )
                    return
                break  # finish the epoch (evaluation + checkpoint) first
            if state.step_in_epoch % args.save_steps == 0 and state.step_in_epoch < steps_per_epoch:
                checkpoint_now()
        bar.close()

        test = evaluate(model, data.test_images, data.test_labels, normalizer, args.eval_batch_size)
        record = {
            "epoch": state.epoch + 1,
            "global_step": state.global_step,
            "train_loss": state.epoch_loss_sum / state.epoch_seen,
            "train_accuracy": state.epoch_correct / state.epoch_seen,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "epoch_train_seconds": state.epoch_seconds,
            "seconds_per_step": state.epoch_seconds / steps_per_epoch,
        }
        state.epoch += 1
        state.step_in_epoch, state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_seconds = (
            0,
            0.0,
            0,
            0,
            0.0,
        )
        is_best = test["accuracy"] > state.best_test_accuracy
        if is_best:
            state.best_test_accuracy = test["accuracy"]
        final = state.epoch == args.epochs
        if is_best or final:
            record["exported_fp16_test_accuracy"] = export_model(
                model, processor, data, normalizer, args, state, record, final
            )
        checkpoint_now()
        append_log(log_path, record)
        print("[epoch] " + json.dumps(record), flush=True)
        out_of_time = out_of_time or time.time() >= deadline
        if stop.signal is not None or out_of_time:
            if not final:
                print(f"[stop] checkpoint at end of epoch {state.epoch}. Resume with --resume.")
            return
    print(f"[done] {args.epochs} epochs; best test top-1 {state.best_test_accuracy:.4f}; model in {output_dir}")


def main(argv: list[str] | None = None) -> None:
    start_time = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        checkpoint = find_checkpoint(Path(args.output_dir))
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {args.output_dir}")
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
        args = merge_resumed_args(args, saved["args"], explicit_options(argv))
        done = saved["train_state"]["epoch"]
        # a run that has not finished its schedule needs one more epoch to train anything (and end with its final
        # model): --epochs done trained nothing, reported "[done]" and left the model card "in progress"
        unfinished = saved["train_state"].get("step_in_epoch", 0) > 0 or saved["args"]["epochs"] > done
        least = done + 1 if unfinished else done
        if args.epochs < least:
            raise ValueError(f"--epochs {args.epochs}: the checkpoint has already trained {done} epochs; pass "
                             f"--epochs {least} or more (or leave it out to finish the saved schedule).")
    elif find_checkpoint(Path(args.output_dir)) is not None:  # before the dataset is decoded
        raise FileExistsError(
            f"{args.output_dir} already holds a checkpoint: pass --resume or use another --output-dir"
        )
    args = finalize_args(args)
    try:
        check_numbers(args, parser)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    train(args, start_time)


if __name__ == "__main__":
    main()
