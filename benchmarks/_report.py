"""What the benchmarks print, also written to `benchmarks/results/`, with the machine that produced it.

Figures quoted in the README must come from a file a command wrote; the speed and size benchmarks print a few lines
each, so [`PrintedReport`] keeps those lines and saves them under a header naming the command, the date, the CPU
(integer kernels' speed depends on its instruction set: VNNI or not) and the library and torch versions.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


QUICK_EVAL_IMAGES = 500


def top1_from_predictions(predicted, labels) -> float:
    """Top-1 of predicted class ids, scored by the `evaluate` metric `optimum_dfq.evaluation` uses (for models that
    run outside PyTorch, such as ONNX Runtime sessions, which `evaluate_accuracy` cannot call)."""
    from optimum_dfq.evaluation import load_top_k_metric

    predicted, labels = [int(p) for p in predicted], [int(label) for label in labels]
    return load_top_k_metric().compute(predictions=[[p] for p in predicted], references=labels, k=[1])["top1"]


def first_test_images(test, eval_limit: int | None, quick: bool = False):
    """The test split, or its first `eval_limit` images (`--quick` without `--eval-limit`: the first
    `QUICK_EVAL_IMAGES`, or all of a smaller split). An `--eval-limit` above the split's size is refused, not
    clipped, so that a table never claims more test images than it was measured on."""
    if eval_limit is None and quick:
        eval_limit = min(QUICK_EVAL_IMAGES, len(test))
    if eval_limit is None:
        return test
    if not 1 <= eval_limit <= len(test):
        raise SystemExit(f"--eval-limit {eval_limit}: the test split holds {len(test)} images; pass 1 to "
                         f"{len(test)} (or leave it out to evaluate on all of them).")
    return test.select(range(eval_limit))


def cpu_description() -> str:
    """`"<CPU model>, <n> cores, <instruction sets that matter for int8 kernels>"` (Linux; less elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86") or not flags:
        return f"{model}, {os.cpu_count()} cores, {platform.machine()}"  # no x86 flags to report (ARM: no saturation)
    features = [name for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if name in flags]
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & flags else "no VNNI"
    return f"{model}, {os.cpu_count()} cores, {'/'.join(features) or 'no AVX2'} ({vnni})"


class PrintedReport:
    """Prints lines and saves them to `path` with a provenance header.

    Args:
        path (`str` or `os.PathLike`): the text file to write (its folder is created).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lines: list[str] = []

    def print(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        import torch

        from optimum_dfq import __version__

        header = [
            f"$ python {shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}",
            (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; optimum_dfq {__version__}, "
             f"torch {torch.__version__}; {cpu_description()}"),
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(header + self.lines) + "\n")
        print(f"(written to {self.path})")
