"""Cost of one synthesis step relative to one plain forward + backward pass.

For each synthesizer, on a DeiT-Tiny-sized random model (DeiTForImageClassificationWithTeacher: hidden 192, 3 heads,
12 layers, 224 px, patch 16, 1000 classes), every optimisation step of the shared engine is followed by one plain
forward + backward w.r.t. the pixels (cross-entropy to random labels, default attention implementation, frozen
weights) of as many images as the step forwards, timed separately. Each step is thus paired with a plain pass run
under the same machine load, and the reported ratio is the median of the per-pair ratios. Targets: <= 1.3 for
psaq and dfq-vit; for sardfq, whose MSR crops add model inputs, the ratio is per image-forward (the plain pass runs
on the step's images + crops), target <= 1.3. `dfq-vit+hardness` is DFQ-ViT with its opt-in hardness term
(`hardness_weight=10`): in phase 2 each step also runs a provisional fake-quantized copy of the model forward and
backward (built at the phase's first step, which is untimed), so its phase-2 ratio is per float-model forward and has
no target: it is the price of the option.

    python benchmarks/synthesis_speed.py                                # full size
    python benchmarks/synthesis_speed.py --layers 4 --steps 3 --threads 1   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _report import RESULTS, PrintedReport
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

from optimum_dfq.calibration.data import expected_image_shape
from optimum_dfq.models import get_adapter
from optimum_dfq.synthesis import get_synthesizer, optimize_batch
from optimum_dfq.synthesis.features import probe_attention_sites
from optimum_dfq.synthesis.normalization import valid_pixel_range
from optimum_dfq.synthesis.pixel_synthesizer import ModelInfo, frozen_model

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def build_model(layers: int, image_size: int) -> DeiTForImageClassificationWithTeacher:
    torch.manual_seed(0)
    config = DeiTConfig(image_size=image_size, patch_size=16, hidden_size=192, num_hidden_layers=layers,
                        num_attention_heads=3, intermediate_size=768, num_labels=1000)
    return DeiTForImageClassificationWithTeacher(config).eval()


def plain_pass(model, rows: int):
    """A closure running one plain forward + backward w.r.t. the pixels of `rows` images."""
    pixels = torch.randn(rows, *expected_image_shape(model), requires_grad=True)
    labels = torch.randint(model.config.num_labels, (rows,))

    def run() -> None:
        loss = F.cross_entropy(model(pixel_values=pixels).logits, labels)
        pixels.grad = None
        loss.backward()

    return run


class PairedClock:
    """Progress-bar stand-in: times each engine step, then runs and times one plain pass after it."""

    def __init__(self, plain) -> None:
        self.plain = plain
        self.steps: list[float] = []
        self.plains: list[float] = []
        self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.steps.append(time.perf_counter() - self.last)
        start = time.perf_counter()
        self.plain()
        self.plains.append(time.perf_counter() - start)
        self.last = time.perf_counter()


#: Synthesizer variants measured besides the registered names: name -> (synthesizer, options).
VARIANTS = {"dfq-vit+hardness": ("dfq-vit", {"hardness_weight": 10.0})}


def measure(name: str, info: ModelInfo, batch: int, steps: int, warmup: int) -> dict:
    if warmup < 1:
        raise SystemExit("--warmup must be >= 1: the first step of a phase may build models (dfq-vit+hardness).")
    synthesizer, options = VARIANTS.get(name, (name, {}))
    synth = get_synthesizer(synthesizer, iterations=(warmup + steps,) * 2, warmup=2, jitter=(15, 30),
                            log_every=10**6, **options)
    plan = synth.plan_batch(info, list(range(batch)), seed=0)
    rows = plan.owners.numel()
    clock = PairedClock(plain_pass(info.model, rows))
    optimize_batch(info.model, plan, synth.engine_config(False), bounds=valid_pixel_range(MEAN, STD),
                   sites=info.sites, num_prefix_tokens=info.num_prefix_tokens, seed=0, progress=clock)
    per_phase = warmup + steps
    phases = {}
    for phase in (0, 1):
        window = slice(phase * per_phase + warmup, (phase + 1) * per_phase)
        step, plain = clock.steps[window], clock.plains[window]
        phases[phase] = {"step": statistics.median(step), "plain": statistics.median(plain),
                         "ratio": statistics.median(s / p for s, p in zip(step, plain))}
    return {"rows": rows, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each phase")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--synthesizers", nargs="+", default=["psaq", "sardfq", "dfq-vit", "dfq-vit+hardness"])
    parser.add_argument("--output", default=str(RESULTS / "synthesis_speed.txt"), help="where the printed lines go")
    args = parser.parse_args()
    report = PrintedReport(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.layers, args.image_size)
    adapter = get_adapter(model)
    report.print(f"DeiT-Tiny-sized model: {args.layers} layers, {args.image_size}px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), attention={model.config._attn_implementation}, "
          f"{args.steps} timed steps per phase")
    report.print(f"{'synthesizer':<18}{'phase':>6}{'rows':>6}{'step ms':>10}{'plain ms':>10}{'ratio':>8}")
    with frozen_model(model, None) as device:
        info = ModelInfo(model, adapter, probe_attention_sites(model, adapter), expected_image_shape(model),
                         model.config.num_labels, device)
        for name in args.synthesizers:
            result = measure(name, info, args.batch_size, args.steps, args.warmup)
            for phase, numbers in result["phases"].items():
                report.print(f"{name:<18}{phase + 1:>6}{result['rows']:>6}{numbers['step'] * 1000:>10.0f}"
                             f"{numbers['plain'] * 1000:>10.0f}{numbers['ratio']:>8.2f}")
    report.print("ratio = median over steps of (step time / plain forward+backward time on the same number of rows); "
                 "for sardfq rows include the MSR crops, so it is the ratio per image-forward; dfq-vit+hardness "
                 "phase 2 also runs the provisional quantized model forward and backward.")
    report.save()


if __name__ == "__main__":
    main()
