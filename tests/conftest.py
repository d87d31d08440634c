"""Shared fixtures: tiny random ViT/DeiT/Swin models and a small real CIFAR-10 fixture."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and thread hand-offs make them many times slower on a busy CPU;
# subprocesses (CLI, fresh-interpreter loads, torchrun workers) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Synthesis caches by default (in the user's HF cache); a test that synthesizes twice would then compare a set with
# itself. Tests of the default cache turn it back on with a temporary folder (fixture `default_synthesis_cache`).
os.environ["OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE"] = "1"

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _labels() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, **_labels())
    return ViTForImageClassification(config).eval()


def _deit_config() -> DeiTConfig:
    return DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_labels=10, **_labels())


def tiny_deit() -> DeiTForImageClassification:
    torch.manual_seed(0)
    return DeiTForImageClassification(_deit_config()).eval()


def tiny_deit_teacher() -> DeiTForImageClassificationWithTeacher:
    torch.manual_seed(0)
    return DeiTForImageClassificationWithTeacher(_deit_config()).eval()


def tiny_swin() -> SwinForImageClassification:
    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
                        num_labels=10, **_labels())
    return SwinForImageClassification(config).eval()


TINY_MODELS = {"vit": tiny_vit, "deit": tiny_deit, "deit_teacher": tiny_deit_teacher, "swin": tiny_swin}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """Each tiny random model family in turn."""
    return TINY_MODELS[request.param]()


@pytest.fixture(scope="session")
def image_processor() -> ViTImageProcessor:
    return ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, image_mean=CIFAR_MEAN,
                             image_std=CIFAR_STD)


@pytest.fixture(scope="session")
def cifar_train():
    """64 real CIFAR-10 training images (the calibration pool)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"train": str(FIXTURES / "cifar10_tiny_train.parquet")}, split="train")


@pytest.fixture(scope="session")
def cifar_test():
    """256 real CIFAR-10 test images (never used for calibration)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"test": str(FIXTURES / "cifar10_tiny_test.parquet")}, split="test")


def two_image_columns(dataset):
    """`dataset` (with its `img` column) plus a second Image column, `other`, holding the images of the rows in
    reverse order."""
    from datasets import Image

    encoded = dataset.cast_column("img", Image(decode=False))
    pairs = encoded.add_column("other", encoded["img"][::-1], feature=Image(decode=False))
    return pairs.cast_column("img", Image()).cast_column("other", Image())


@pytest.fixture(scope="session")
def cifar_test_pixels(cifar_test, image_processor) -> torch.Tensor:
    images = [image.convert("RGB") for image in cifar_test["img"]]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.fixture
def single_thread():
    """Runs a test with one intra-op thread (opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`).

    The tiny models' ops are far too small to gain from threads; on a shared, busy CPU the thread hand-offs make such
    tests 10-20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def default_synthesis_cache(monkeypatch, tmp_path) -> Path:
    """Turns the default synthesis cache on, in a temporary `OPTIMUM_DFQ_CACHE`; returns its synthesis folder."""
    monkeypatch.delenv("OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE")
    monkeypatch.setenv("OPTIMUM_DFQ_CACHE", str(tmp_path / "dfq-cache"))
    return tmp_path / "dfq-cache" / "synthesis"


@pytest.fixture
def count_optimised_batches(monkeypatch):
    """A function that, once called, counts the batches the pixel synthesizers optimise from then on (a run loaded
    from the synthesis cache optimises none); it returns the list that grows by one item per batch."""
    from optimum_dfq.synthesis import pixel_synthesizer

    def start() -> list[int]:
        optimised, real = [], pixel_synthesizer.optimize_batch

        def counting(*args, **kwargs):
            optimised.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(pixel_synthesizer, "optimize_batch", counting)
        return optimised

    return start


@pytest.fixture
def set_last_change():
    """A function `(folder, seconds_ago)` that dates the last change of `folder` and of everything in it (a cached
    run's last change, as `optimum-dfq cache list` shows it) `seconds_ago` seconds back."""

    def backdate(folder: Path, seconds_ago: float) -> None:
        when = time.time() - seconds_ago
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (when, when), follow_symlinks=False)

    return backdate


_HOLD_RUN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
with run_lock.hold_run_lock(sys.argv[2]) as held:
    print(held, flush=True)
    sys.stdin.read()  # holds the run until the test closes stdin (or kills the process)
"""


class RunHolder:
    """Another process holding a cached run's lock as each process of a synthesis does (`hold_run_lock`, loaded
    from its file alone so that the process starts in well under a second), until [`RunHolder.end`] (it ends
    normally) or [`RunHolder.kill`] (SIGKILL: a crash)."""

    def __init__(self, folder: Path) -> None:
        import subprocess
        import sys

        from optimum_dfq.synthesis import run_lock

        self.process = subprocess.Popen([sys.executable, "-c", _HOLD_RUN, run_lock.__file__, str(folder)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        held = self.process.stdout.readline().strip()
        assert held == "True", f"the holder did not lock {folder}: {held!r}"

    def end(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0

    def kill(self) -> None:
        self.process.kill()
        assert self.process.wait(timeout=60) == -9


@pytest.fixture
def hold_run():
    """A function `(run folder) -> RunHolder`: another process holds the run as a synthesis going on does; every
    holder still going is killed after the test."""
    holders = []

    def start(folder: Path) -> RunHolder:
        holders.append(RunHolder(folder))
        return holders[-1]

    yield start
    for holder in holders:
        if holder.process.poll() is None:
            holder.kill()
        for pipe in (holder.process.stdin, holder.process.stdout):
            pipe.close()
