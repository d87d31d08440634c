"""`PixelSynthesizer`: the common driver of optimisation-based synthesizers (PSAQ-ViT, SARDFQ, DFQ-ViT).

It cuts the images into batches on a fixed grid of consecutive global indices (`range(0, num_images, batch_size)`),
hands whole batches to the processes, runs the engine on each batch, caches and resumes per batch, gathers the
batches and records provenance. Subclasses only say what to optimise for a batch ([`PixelSynthesizer.plan_batch`]).

The grid is fixed when a run starts: by `batch_size` when it is given, otherwise by `num_images` and the number of
processes (`min(32, ceil(num_images / num_processes))`, so that every process gets a batch). It never depends on what
a resumed run has left to do. With the same `batch_size`, one process, several processes and an
interrupted-then-resumed run give bit-identical images (on the same hardware and software). A different
`batch_size` gives slightly different images: every loss term is per image, but the floating-point results of a
batched forward pass depend on the batch's composition, and the optimisation amplifies those differences. So pass
`batch_size` explicitly for images that do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.data import (
    CalibrationSet,
    check_image_processor,
    check_processor_output_size,
    expected_image_shape,
)
from ..errors import ConfigError, SynthesisError
from ..models.adapters import ModelAdapter, get_adapter, window_sizes_kept
from ..models.state import eval_mode
from ..registry import qualified_name
from ..version import __version__
from .base import SYNTHESIZERS, Synthesizer, check_synthesis_arguments
from .cache import DISABLE_CACHE_ENV, SynthesisCache, resolve_cache_dir
from .context import BatchPlan, BatchRecord
from .dataset import to_jsonable
from .distributed import broadcast_from_main, gather_lists, resolve_state, shard_chunks
from .engine import EngineConfig, optimize_batch
from .features import AttentionSite, probe_attention_sites
from .geometry import TokenGrid, probe_token_grids
from .hashing import model_config_material, model_fingerprint, run_fingerprint
from .normalization import normalization_stats, valid_pixel_range
from .shared_folder import processes_not_sharing

logger = logging.getLogger(__name__)

#: PSAQ-ViT's learning rates: 0.25 for windowed attention (Swin), 0.2 otherwise.
DEFAULT_LR = {False: 0.2, True: 0.25}
DEFAULT_BATCH_SIZE = 32


@dataclass
class ModelInfo:
    """What a synthesizer knows about the model when planning a batch.

    Built by [`PixelSynthesizer.synthesize`] and passed to `plan_batch` and `finish_batch`.

    Attributes:
        model (`nn.Module`): the frozen model (eval mode, no parameter gradients, on `device`).
        adapter (`ModelAdapter`): its adapter.
        sites (`list[AttentionSite]`): its attention modules, in forward order.
        image_shape (`tuple[int, int, int]`): `(C, H, W)` of the model's inputs, from its config.
        num_labels (`int`): classes of the classifier (`model.config.num_labels`).
        device (`torch.device`): where the optimisation runs.
        normalization (`tuple[list[float], list[float]]`, *optional*): the model's `(image_mean, image_std)`.
        num_prefix_tokens (`int`): read-only; the adapter's CLS (+ distillation) token count.
    """

    model: nn.Module
    adapter: ModelAdapter
    sites: list[AttentionSite]
    image_shape: tuple[int, int, int]
    num_labels: int
    device: torch.device
    normalization: tuple[list[float], list[float]] | None = None

    @property
    def num_prefix_tokens(self) -> int:
        """CLS (+ distillation) tokens before the patch tokens (0 for Swin)."""
        return self.adapter.num_prefix_tokens

    @cached_property
    def token_grids(self) -> dict[int, TokenGrid]:
        """Where each attention module's tokens lie in the image ([`probe_token_grids`]); probed once, on first use."""
        return probe_token_grids(self.model, self.adapter, self.sites)


class PixelSynthesizer(Synthesizer):
    """Abstract base class of synthesizers that optimise pixels with the shared engine ([`optimize_batch`]).

    A subclass implements [`~PixelSynthesizer.plan_batch`] (what to optimise for a batch) and may override
    [`~PixelSynthesizer.finish_batch`] and [`~PixelSynthesizer.finalize`]; batching, sharding over processes,
    caching and provenance come from [`~PixelSynthesizer.synthesize`]. All arguments are keyword-only.

    Args:
        lr (`float`, *optional*): peak learning rate; PSAQ-ViT's 0.2 (ViT/DeiT) or 0.25 (Swin) when `None`.
        betas (`Sequence[float]`, defaults to `(0.5, 0.9)`): Adam betas.
        eps (`float`, defaults to 1e-8): Adam epsilon.
        iterations (`int` or `Sequence[int]`, defaults to `(500, 500)`): steps of each phase (an `int` is one phase).
        warmup (`int`, defaults to 100): warm-up steps of each phase.
        jitter (`int` or `Sequence[int]`, defaults to `(15, 30)`): maximum roll offset of each phase, in pixels (one
            value is used for every phase). PSAQ-ViT's values, for 224-pixel inputs; not scaled with the image size
            unless `jitter_reference` is set (on 32-pixel inputs a roll of up to 30 pixels is nearly a random cyclic
            shift of the whole image).
        jitter_reference (`int`, *optional*): the input side `jitter` is given for. When set, each offset is scaled
            by the model's shorter input side / `jitter_reference` and rounded (`jitter_reference=224` turns
            15/30 into 2/4 on 32-pixel inputs, a nonzero offset never below 1). `None` (the default): offsets as given.
        flip_prob (`float`, defaults to 0.5): horizontal-flip probability.
        log_every (`int`, defaults to 50): INFO logging (and loss-history summary) period, in steps.
        batch_size (`int`, *optional*): the default `batch_size` of [`PixelSynthesizer.synthesize`]; settable here
            so that `DFQConfig(synthesizer_kwargs={"batch_size": 8})` and recipes can fix it. Not part of the cache
            key (a finished set is reused whatever its batch size).
        checkpoint_every (`int`, *optional*, defaults to 100): with a synthesis cache (the default), a batch being
            optimised is saved every this many steps (and on Ctrl-C), so that an interrupted run resumes it from there
            rather than from step 0, with the same result. `None` or 0: saved on Ctrl-C only (a killed process then
            restarts its batches). Not part of the cache key. A checkpoint holds the pixels and Adam's two moments in
            float32, three times the batch's pixels (3 x 32 x 3 x 224 x 224 x 4 bytes = 58 MB for 32 images at
            224 px), and is removed when the batch is finished.

    Raises:
        `SynthesisError`: if the settings are invalid (checked by [`EngineConfig`]).

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq.synthesis import BatchPlan, CrossEntropyTerm, PixelSynthesizer, image_generator
    >>> class ClassZero(PixelSynthesizer):  # pushes every image towards class 0
    ...     def plan_batch(self, info, indices, seed):
    ...         init = torch.stack([torch.randn(info.image_shape, generator=image_generator(seed, i)) for i in indices])
    ...         labels = torch.zeros(len(indices), dtype=torch.long)
    ...         return BatchPlan(indices, init, [CrossEntropyTerm(labels.to(info.device))], labels=labels)
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> calib = ClassZero(iterations=(2, 2), warmup=1, jitter=(2, 4)).synthesize(model, 3, image_mean=[0.5] * 3,
    ...                                                                          image_std=[0.5] * 3)
    >>> calib.pixel_values.shape, calib.labels.tolist()
    (torch.Size([3, 3, 32, 32]), [0, 0, 0])
    ```
    """

    #: Whether the method aims every image at classes of the model's classifier (cross-entropy or soft labels); such
    #: a method needs a head with at least 2 classes, which [`PixelSynthesizer.synthesize`] checks first.
    class_conditional: bool = False

    def __init__(
        self,
        *,
        lr: float | None = None,
        betas: Sequence[float] = (0.5, 0.9),
        eps: float = 1e-8,
        iterations: Sequence[int] | int = (500, 500),
        warmup: int = 100,
        jitter: Sequence[int] | int = (15, 30),
        jitter_reference: int | None = None,
        flip_prob: float = 0.5,
        log_every: int = 50,
        batch_size: int | None = None,
        checkpoint_every: int | None = 100,
    ) -> None:
        if batch_size is not None:
            grid_batch_size(1, batch_size)  # refuses a non-positive or non-integer batch size now, not at synthesis
        self.batch_size = batch_size
        if checkpoint_every is not None:
            (checkpoint_every,) = _whole_numbers("checkpoint_every", checkpoint_every)
            if checkpoint_every < 0:
                raise SynthesisError(f"checkpoint_every must be a number of steps >= 0 (0 or None: only on Ctrl-C); "
                                     f"got {checkpoint_every}.")
        self.checkpoint_every = checkpoint_every
        self.lr = None if lr is None else float(lr)
        self.betas = tuple(float(b) for b in betas)
        self.eps = float(eps)
        self.iterations = _whole_numbers("iterations", iterations)
        (self.warmup,) = _whole_numbers("warmup", warmup)
        self.jitter = _whole_numbers("jitter", jitter)
        if jitter_reference is not None and (isinstance(jitter_reference, bool) or not isinstance(jitter_reference, int)
                                             or jitter_reference < 1):
            raise SynthesisError(f"jitter_reference must be a positive input side in pixels (e.g. 224) or None; got "
                                 f"{jitter_reference!r}.")
        self.jitter_reference = jitter_reference
        self.flip_prob = float(flip_prob)
        self.log_every = int(log_every)
        self.engine_config(windowed=False)

    def engine_config(self, windowed: bool, image_size: Sequence[int] | None = None) -> EngineConfig:
        """The engine settings for a model with (`windowed=True`) or without windowed attention.

        Args:
            windowed (`bool`): whether the model uses windowed attention (Swin); picks the default `lr`.
            image_size (`Sequence[int]`, *optional*): `(H, W)` of the model's inputs; with `jitter_reference`, the
                jitter is scaled to it (ignored without `jitter_reference`).

        Returns:
            `EngineConfig`
        """
        return EngineConfig(
            lr=self.lr if self.lr is not None else DEFAULT_LR[windowed], betas=self.betas, eps=self.eps,
            iterations=self.iterations, warmup=self.warmup, jitter=self.scaled_jitter(image_size),
            flip_prob=self.flip_prob, log_every=self.log_every,
        )

    def scaled_jitter(self, image_size: Sequence[int] | None) -> tuple[int, ...]:
        """The maximum roll offsets used on inputs of `image_size` (`(H, W)`; see `jitter_reference`).

        Example:
            >>> from optimum_dfq.synthesis import get_synthesizer
            >>> get_synthesizer("psaq", jitter_reference=224).scaled_jitter((32, 32))
            (2, 4)
        """
        if self.jitter_reference is None or image_size is None:
            return self.jitter
        ratio = min(image_size) / self.jitter_reference
        return tuple(max(1, round(j * ratio)) if j > 0 else 0 for j in self.jitter)

    def _check_classes(self, model: nn.Module) -> None:
        num_labels = int(model.config.num_labels)
        if self.class_conditional and num_labels < 2:
            head = "no classifier" if num_labels == 0 else "a single output, e.g. a regression head"
            raise SynthesisError(
                f"The {self.name!r} synthesizer aims every image at a class of the model's classifier, but the model "
                f"has num_labels={num_labels} ({head}): there is no class to aim at. Calibrate it with "
                "synthesizer='gaussian' or with real images (calibration_dataset=...)."
            )

    @abstractmethod
    def plan_batch(self, info: ModelInfo, indices: list[int], seed: int) -> BatchPlan:
        """Initial images, loss terms (with their targets) and views of one batch.

        Every random draw for image `i` must come from generators seeded by `(seed, i)` (see
        [`image_generator`] and [`stream_generator`]), so that its draws do not depend on its batch-mates (the
        batches themselves lie on a fixed grid, see [`PixelSynthesizer.synthesize`]).

        Args:
            info (`ModelInfo`): the model, its attention sites, input shape, classes and device.
            indices (`list[int]`): global indices of the batch's images (consecutive).
            seed (`int`): the run's seed.

        Returns:
            `BatchPlan`: `init` may be on any device (it is moved to `info.device`); targets put on `info.device`
            here are not copied again at every step.
        """

    def finish_batch(self, info: ModelInfo, plan: BatchPlan, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-image values to record for a finished batch; none by default.

        Args:
            info (`ModelInfo`): as given to `plan_batch`.
            plan (`BatchPlan`): the batch's plan.
            images (`torch.Tensor`): `[B, C, H, W]` final images (CPU).

        Returns:
            `dict[str, torch.Tensor]`: name → `[B]` values, stored in `metadata["per_image"][name]`.
        """
        return {}

    def finalize(self, calibration_set: CalibrationSet) -> CalibrationSet:
        """Last touch on the assembled set (e.g. reordering); identity by default.

        Args:
            calibration_set (`CalibrationSet`): all images in global index order, with metadata.

        Returns:
            `CalibrationSet`
        """
        return calibration_set

    def synthesize(
        self,
        model,
        num_images: int,
        *,
        seed: int = 0,
        image_processor=None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        batch_size: int | None = None,
        state=None,
        cache_dir: str | os.PathLike | bool | None = None,
        device: str | torch.device | None = None,
        on_batch_end: Callable[[BatchRecord], None] | None = None,
    ) -> CalibrationSet:
        """Synthesizes `num_images` calibration images for `model`.

        Args:
            model (`PreTrainedModel`): a ViT, DeiT or Swin classifier; left unchanged (mode, gradients, device,
                dtype: a float16/bfloat16 model is run in float32 for the synthesis, as `quantize` runs it).
            num_images (`int`): how many images.
            seed (`int`, defaults to 0): the run's seed. Image `i` is defined by `(seed, i)` and its batch on the
                grid `range(0, num_images, batch_size)`: for a given `batch_size` it does not depend on the number of
                processes nor on interruptions and resumption, but may differ slightly for another `batch_size`.
            image_processor (*optional*): the model's image processor; its mean/std give the valid pixel range.
            image_mean (`Sequence[float]`, *optional*), image_std (`Sequence[float]`, *optional*): explicit
                normalisation instead of `image_processor`.
            batch_size (`int`, *optional*): images optimised together; the batches are
                `range(0, num_images, batch_size)` (the last one may be smaller). Every loss term is per image, but
                the floating-point results of a batched forward pass depend on the batch, so another `batch_size`
                gives slightly different images. Defaults to the synthesizer's `batch_size`, else to
                `min(32, ceil(num_images / num_processes))`, so that every process gets a batch (the images then
                depend on the number of processes: pass `batch_size` to make them independent of it); a run resumed
                from the cache without a `batch_size` takes the one of the batches it finds there.
            state (`accelerate.PartialState`, *optional*): process state; built with `cpu=<no CUDA>` if omitted.
                Whole batches are split over its processes and gathered on all of them.
            cache_dir (`str`, `PathLike` or `bool`, *optional*): cache root, by default the library's synthesis
                cache ([`~optimum_dfq.synthesis.cache.default_cache_dir`]: `$HF_HOME/optimum_dfq/synthesis`, or
                `$OPTIMUM_DFQ_CACHE/synthesis`); `False` keeps nothing, as does `OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE=1`
                for the default. With several processes the folder must be one that every process sees (one
                filesystem, whatever the machines): a probe file checks it before the run
                ([`~optimum_dfq.synthesis.shared_folder.processes_not_sharing`]); a default cache that some process
                does not share is not used (a warning says so, and the run keeps nothing), an explicit one raises. A
                finished run with the same synthesizer, resolved hyper-parameters (`log_every` aside), model weights
                and configuration, normalisation, seed and `num_images` is loaded instead of recomputed (whatever its
                `batch_size`, recorded in the set's metadata), and an interrupted one resumes with the batches it has
                not finished, each batch being optimised from its last checkpoint (every `checkpoint_every` steps and
                on Ctrl-C, when a warning says what is kept), to the images of an uninterrupted run. Cached batches
                of another `batch_size` are ignored. While it runs, every process holds the run's lock
                ([`SynthesisCache.running`]), so that `optimum-dfq cache` shows the run as running and neither
                deletes nor prunes it.
            device (`str` or `torch.device`, *optional*): where to optimise (the model's device by default; the model
                is moved there for the run and back afterwards).
            on_batch_end (`Callable[[BatchRecord], None]`, *optional*): called after each finished (and cached)
                batch of this process.

        Returns:
            `CalibrationSet`: images in the model's normalised space, hard labels, soft labels when the method makes
            them, and metadata (method, hyper-parameters, model fingerprint, seed, batch size, library version, loss
            history).

        Raises:
            `SynthesisError`: if `num_images` is not a positive `int`, `batch_size` is below 1, no valid
                normalisation is given (neither `image_processor` nor `image_mean`/`image_std`), or the gathered
                batches do not cover the `num_images` images exactly once.
            `UnsupportedArchitectureError`: if the model is not a supported ViT, DeiT or Swin classifier.
            `ImageSizeError`: if `image_processor` resizes every image to another size than the model takes (it was
                made for another model).
            `ConfigError`: if `image_processor` is a path or Hub id instead of the processor, `cache_dir` is
                neither a folder nor a bool/`None`, or (several processes) `cache_dir` names a folder that some
                process does not share with the main process (raised on every process).

        A class-conditional method (`class_conditional`: PSAQ-ViT, SARDFQ, DFQ-ViT) also raises `SynthesisError` for
        a head with fewer than 2 classes (`num_labels=1`, e.g. a regression head, whose class term is identically
        0; `num_labels=0`, no classifier), before any image is synthesized.

        Example:

        ```python
        >>> from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
        >>> from optimum_dfq.synthesis import get_synthesizer
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=10))
        >>> processor = ViTImageProcessor(size={"height": 32, "width": 32})
        >>> synth = get_synthesizer("psaq", iterations=(2, 2), warmup=1, jitter=(2, 4))  # tiny run; defaults: 2 × 500
        >>> calib = synth.synthesize(model, 2, seed=0, image_processor=processor)
        >>> calib.pixel_values.shape, calib.metadata["synthesizer"], calib.metadata["num_images"]
        (torch.Size([2, 3, 32, 32]), 'psaq', 2)
        ```
        """
        check_synthesis_arguments(num_images, seed)
        state = resolve_state(state)
        cache_root = _cache_for_run(state, cache_dir)
        batch_size_chosen = batch_size if batch_size is not None else self.batch_size
        batch_size = grid_batch_size(num_images, batch_size_chosen, state.num_processes)
        adapter = get_adapter(model)
        self._check_classes(model)
        shape = expected_image_shape(model)
        check_image_processor(image_processor)
        if image_processor is not None:  # one made for another model: its mean/std are likely not this model's either
            check_processor_output_size(image_processor, shape)
        mean, std = normalization_stats(image_processor, image_mean, image_std, shape[0])
        config = self.engine_config(adapter.windowed, shape[1:])
        material = self._run_material(model, num_images, seed, mean, std, config)
        key = run_fingerprint(material)
        cache = SynthesisCache(cache_root, key) if cache_root is not None else None
        with cache.running() if cache is not None else contextlib.nullcontext():  # live: `optimum-dfq cache` keeps it
            if cache is not None and state.is_main_process:
                cache.remove_abandoned_temporaries()
            cached_set = cache.load_complete_if_readable() if cache is not None and state.is_main_process else None
            if broadcast_from_main(state, cached_set is not None):
                _log_main(state, "Loading the cached calibration set from %s", cache.complete_path)
                return cached_set if cached_set is not None else cache.load_complete()
            if cache is not None and batch_size_chosen is None:
                batch_size = _resume_batch_size(state, cache, num_images, batch_size)
            grid = batch_grid(num_images, batch_size)
            done = broadcast_from_main(  # only the main process reads (and may move aside) the cached shards
                state, cache.finished_chunks(grid) if cache is not None and state.is_main_process else [])
            if cache is not None and state.is_main_process:
                cache.write_run_info(material)
            finished = set(done)
            pending = [chunk for chunk in grid if chunk not in finished]
            if done:
                _log_main(state, "Resuming: %d of %d images already cached", sum(b - a for a, b in done), num_images)
            _warn_idle_processes(state, len(pending), batch_size)
            try:
                with frozen_model(model, device) as run_device:
                    info = ModelInfo(model, adapter, probe_attention_sites(model, adapter), shape,
                                     int(model.config.num_labels), run_device, (list(mean), list(std)))
                    my_chunks = shard_chunks(pending, state.process_index, state.num_processes)
                    records = self._run_chunks(info, my_chunks, seed, config, state, cache, on_batch_end)
            except KeyboardInterrupt:
                _warn_interrupted(state, cache, grid)
                raise
            records = gather_lists(state, records)
            if cache is not None:
                records += [cache.take_shard(start, stop) for start, stop in done]
            records.sort(key=lambda record: record.start)
            _check_cover(records, grid, cache)
            calibration_set = self.finalize(self._assemble(records, material, config, key, batch_size))
            if len(calibration_set) != num_images:
                raise SynthesisError(f"The assembled calibration set has {len(calibration_set)} images instead of "
                                     f"num_images={num_images}; {type(self).__name__}.finalize must keep every image.")
            if cache is not None:
                saved = broadcast_from_main(state,
                                            cache.save_complete(calibration_set) if state.is_main_process else None)
                if state.is_main_process:
                    cache.discard_checkpoints()
                state.wait_for_everyone()
                if not saved:  # a concurrent run of the same key finished first: its set is the cached one, use it too
                    _log_main(state, "Another run of the same key finished first; using its set from %s",
                              cache.complete_path)
                    return cache.load_complete()
            return calibration_set

    def _run_chunks(self, info, chunks, seed, config, state, cache, on_batch_end) -> list[BatchRecord]:
        from tqdm.auto import tqdm

        bounds = valid_pixel_range(*info.normalization)
        records = []
        with tqdm(total=len(chunks) * config.total_steps, desc=f"{self.name} synthesis",
                  disable=not state.is_main_process) as progress:
            for start, stop in chunks:
                plan = self.plan_batch(info, list(range(start, stop)), seed)
                plan.init = plan.init.to(info.device)
                checkpoint = cache.batch_checkpoint(start, stop, self.checkpoint_every) if cache is not None else None
                result = optimize_batch(info.model, plan, config, bounds=bounds, sites=info.sites,
                                        num_prefix_tokens=info.num_prefix_tokens, seed=seed, progress=progress,
                                        log=state.is_main_process, checkpoint=checkpoint)
                extras = self.finish_batch(info, plan, result.images)
                record = BatchRecord(start, stop, result.images, _cpu(plan.labels), _cpu(plan.soft_labels),
                                     {k: v.detach().cpu() for k, v in extras.items()}, result.history)
                if cache is not None:
                    cache.write_shard(record)
                    checkpoint.discard()
                records.append(record)
                if on_batch_end is not None:
                    on_batch_end(record)
        return records

    def resolved_hyperparameters(self, config: EngineConfig) -> dict[str, Any]:
        """The hyper-parameters as the run uses them: engine settings resolved, `log_every` left out.

        What the cache key hashes: passing a default explicitly (e.g. `lr=0.2` on a ViT) or changing the logging
        period gives the same key.

        Args:
            config (`EngineConfig`): the run's engine settings ([`PixelSynthesizer.engine_config`]).

        Returns:
            `dict[str, Any]`
        """
        # log_every and batch_size are recorded in the set's metadata; jitter_reference only through the jitter it
        # resolves to (`engine`), which is what the images depend on; checkpoint_every does not change the images
        ignored = ("log_every", "batch_size", "jitter_reference", "checkpoint_every")
        engine = {k: v for k, v in asdict(config).items() if k not in ignored}
        return {k: v for k, v in self.hyperparameters().items() if k not in ignored} | engine

    def _run_material(self, model, num_images: int, seed: int, mean, std, config: EngineConfig) -> dict[str, Any]:
        material: dict[str, Any] = {}
        if SYNTHESIZERS.get(self.name) is not type(self):
            # An unregistered subclass inherits its parent's `name`: its class keeps its images apart in the cache.
            material["synthesizer_class"] = qualified_name(type(self))
        return material | {
            "synthesizer": self.name,
            "hyperparameters": self.resolved_hyperparameters(config),
            "model": {
                "class": type(model).__name__,
                "name_or_path": getattr(model.config, "_name_or_path", "") or "",  # provenance only: not hashed
                "fingerprint": model_fingerprint(model),
                "config": model_config_material(model.config),
            },
            "num_images": num_images,
            "seed": seed,
            "image_mean": list(mean),
            "image_std": list(std),
            "library_version": __version__,
        }

    def _assemble(self, records: list[BatchRecord], material: dict[str, Any], config: EngineConfig, key: str,
                  batch_size: int) -> CalibrationSet:
        pixel_values = torch.cat([record.pixel_values for record in records])
        labels = _cat_optional([record.labels for record in records])
        soft_labels = _cat_optional([record.soft_labels for record in records])
        extras = {
            name: torch.cat([record.extras[name] for record in records]).tolist() for name in records[0].extras
        }
        metadata = {"source": "synthetic", **material, "engine": asdict(config), "batch_size": batch_size,
                    "cache_key": key, "loss_history": summarize_history(records, config.log_every)}
        if extras:
            metadata["per_image"] = extras
        return CalibrationSet(pixel_values=pixel_values, labels=labels, soft_labels=soft_labels,
                              metadata=to_jsonable(metadata))


def summarize_history(records: list[BatchRecord], every: int) -> dict[str, Any]:
    """Per-step means over all images (batches weighted by size), kept every `every` steps and at the last step.

    Returns:
        `dict`: `{"steps": [...], "<term>": [...], "final": {"<term>": value}}` (`None` where a term was off).
    """
    sizes = [record.stop - record.start for record in records]
    names = list(records[0].history)
    length = len(records[0].history[names[0]]) if names else 0
    steps = sorted(set(range(0, length, every)) | ({length - 1} if length else set()))
    summary: dict[str, Any] = {"steps": steps}
    final = {}
    for name in names:
        means = []
        for step in steps:
            values = [(record.history[name][step], size) for record, size in zip(records, sizes)]
            present = [(v, n) for v, n in values if v is not None]
            means.append(sum(v * n for v, n in present) / sum(n for _, n in present) if present else None)
        summary[name] = means
        final[name] = means[-1] if means else None
    summary["final"] = final
    return summary


def grid_batch_size(num_images: int, batch_size: int | None = None, num_processes: int = 1) -> int:
    """The batch size of a run's grid: `batch_size` (at most `num_images`), or by default
    `min(32, ceil(num_images / num_processes))`, so that every process gets a batch.

    It never depends on a resumed run's remaining images.

    Args:
        num_images (`int`): images of the run.
        batch_size (`int`, *optional*): the requested batch size.
        num_processes (`int`, defaults to 1): processes the run is sharded over (used by the default only).

    Returns:
        `int`

    Raises:
        `SynthesisError`: if `batch_size` is not a positive integer.

    Example:
        >>> grid_batch_size(100), grid_batch_size(5), grid_batch_size(5, 2), grid_batch_size(5, 8)
        (32, 5, 2, 5)
        >>> grid_batch_size(32, num_processes=8), grid_batch_size(100, num_processes=2), grid_batch_size(5, 4, 2)
        (4, 32, 4)
    """
    if batch_size is None:
        return min(DEFAULT_BATCH_SIZE, -(-num_images // max(1, num_processes)))
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise SynthesisError(f"batch_size must be a positive integer, got {batch_size!r}; pass e.g. batch_size=8, or "
                             "None for the default.")
    return min(int(batch_size), num_images)


def batch_grid(num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """The fixed `(start, stop)` batches of a run: `range(0, num_images, batch_size)`, the last one maybe smaller.

    Example:
        >>> batch_grid(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    return [(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]


def _whole_numbers(name: str, values: Sequence[int] | int) -> tuple[int, ...]:
    """`values` (one number or a sequence) as a tuple of `int`s; a string or a fractional number is refused rather
    than truncated (`iterations=2.7` is not 2 steps)."""
    values = tuple(values) if isinstance(values, Sequence) and not isinstance(values, str) else (values,)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
            raise SynthesisError(f"{name} must be whole numbers (one per phase, e.g. {name}=(500, 500)); got "
                                 f"{values if len(values) > 1 else values[0]!r}.")
    return tuple(int(value) for value in values)


def _check_cover(records: list[BatchRecord], grid: list[tuple[int, int]], cache: SynthesisCache | None) -> None:
    got = [(record.start, record.stop) for record in records]
    if got != grid:
        fix = f"delete {cache.shards} and synthesize again" if cache is not None else "synthesize again"
        raise SynthesisError(
            f"The finished batches {got} do not match the run's batch grid {grid}, so the images would overlap or "
            f"leave gaps: a cache shard or a process returned an unexpected batch. To fix it, {fix}."
        )


def _resume_batch_size(state, cache: SynthesisCache, num_images: int, default: int) -> int:
    """The default batch size, or that of the batches cached by the run being resumed (which may have had another
    number of processes, hence another default), so that its work is reused."""
    cached = broadcast_from_main(state, cache.cached_batch_size(num_images) if state.is_main_process else None)
    if cached is None or cached == default:
        return default
    _log_main(state, "Resuming on the batch grid of the cached batches (batch_size=%d instead of the default %d)",
              cached, default)
    return cached


def _cache_for_run(state, cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """The cache root of the run (`None` for none), checked to be shared by every process of a multi-process run.

    Raises:
        `ConfigError`: for an invalid `cache_dir` or cache setting, or an explicit `cache_dir` that some process does
            not share with the main process (raised on every process).
    """
    if cache_dir is None or cache_dir is True:
        return _default_cache_for_run(state)
    root = resolve_cache_dir(cache_dir)
    unshared = processes_not_sharing(state, root) if root is not None and state.num_processes > 1 else {}
    if unshared:
        raise ConfigError(
            f"The synthesis cache folder {root} (cache_dir=) is not shared by every process of this run: "
            f"{_describe_unshared(unshared)}. Every process writes its finished batches there and the main process "
            "reads them back, so the folder must be on a filesystem that every process sees (a local folder such as "
            "/scratch on each machine is not): pass cache_dir= (--cache-dir) such a folder, or cache_dir=False "
            "(--no-cache) to keep no cache."
        )
    return root


def _default_cache_for_run(state) -> Path | None:
    """The default cache, unless the run's processes do not share it: checked with a probe file
    ([`~optimum_dfq.synthesis.shared_folder.processes_not_sharing`]), whatever the machines, as processes on several
    machines may share it (an NFS home) and processes on one may not (containers), or some process turns it off
    (`OPTIMUM_DFQ_DISABLE_SYNTHESIS_CACHE`). Every process takes the same decision, and an invalid setting on any
    process is raised on all of them (raised on its own, it would leave the others waiting in the gather until the
    process group's timeout)."""
    try:
        default, problem = resolve_cache_dir(None), None
    except ConfigError as err:
        default, problem = None, str(err)
    if state.num_processes == 1:
        if problem is not None:
            raise ConfigError(problem)
        return default
    views = gather_lists(state, [(default is not None, problem)])
    problems = [(rank, error) for rank, (_, error) in enumerate(views) if error is not None]
    if problems:
        rank, error = problems[0]
        raise ConfigError(f"{error} (process {rank})")
    enabled = [on for on, _ in views]
    if not any(enabled):  # turned off everywhere: nothing to warn about
        return None
    if all(enabled):
        unshared = processes_not_sharing(state, default)
        if not unshared:
            return default
        why = (f"({default} on the main process) is not shared by every process of this run "
               f"({_describe_unshared(unshared)})")
    else:
        off = ", ".join(str(rank) for rank, on in enumerate(enabled) if not on)
        why = f"is turned off by {DISABLE_CACHE_ENV} on process(es) {off} only"
    if state.is_main_process:
        logger.warning("The default synthesis cache %s, so it is not used and an interrupted run keeps nothing: pass "
                       "cache_dir= (--cache-dir) on a filesystem that every process sees to keep finished batches, or "
                       "cache_dir=False (--no-cache) to silence this.", why)
    return None


def _describe_unshared(unshared: dict[int, str]) -> str:
    """`"process 1 sees no probe file ...; process 2 ..."` (the main process is "the main process")."""
    return "; ".join(f"{'the main process' if rank == 0 else f'process {rank}'} {why}"
                     for rank, why in sorted(unshared.items()))


def _log_main(state, message: str, *args) -> None:
    if state.is_main_process:
        logger.info(message, *args)


def _warn_interrupted(state, cache: SynthesisCache | None, grid: list[tuple[int, int]]) -> None:
    """Says, on Ctrl-C, what an interrupted run keeps and how to resume it."""
    if not state.is_main_process:
        return
    if cache is None:
        logger.warning("Synthesis interrupted: the images synthesized so far are not kept, as the synthesis cache is "
                       "off (cache_dir=False / --no-cache, %s, or a default cache not shared by every process). "
                       "Leave it on, or pass cache_dir= (--cache-dir), to keep every finished batch and resume an "
                       "interrupted run.",
                       DISABLE_CACHE_ENV)
        return
    on_grid = set(grid)
    cached = sum(stop - start for start, stop in cache.shard_ranges() if (start, stop) in on_grid)
    partial = [(start, stop, step) for start, stop, step in cache.partial_progress() if (start, stop) in on_grid]
    kept = "; ".join(f"images {start}-{stop - 1} at step {step}" for start, stop, step in partial)
    if partial:
        kept = f", and {len(partial)} batch(es) being optimised are checkpointed ({kept})"
    elif state.num_processes == 1:
        kept = " (no batch being optimised had reached a checkpoint: those start again)"
    # the other processes save their batches as they stop, maybe after this process looked
    others = " Batches the other processes are still checkpointing are not listed." if state.num_processes > 1 else ""
    logger.warning("Synthesis interrupted: %d of %d images are cached in %s%s.%s Run it again with the same arguments "
                   "(cache_dir, batch_size) to resume.", cached, grid[-1][1], cache.directory, kept, others)


def _warn_idle_processes(state, num_batches: int, batch_size: int) -> None:
    if state.is_main_process and 0 < num_batches < state.num_processes:
        logger.warning(
            "%d batch(es) of up to %d images to synthesize on %d processes: %d process(es) stay idle. Pass a smaller "
            "batch_size (DFQConfig(synthesizer_kwargs={'batch_size': n}), or --batch-size) to use them all (another "
            "batch_size gives slightly different images).",
            num_batches, batch_size, state.num_processes, state.num_processes - num_batches,
        )


@contextlib.contextmanager
def frozen_model(model: nn.Module, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Puts `model` in eval mode without parameter gradients, in float32 (optionally on `device`), and restores it
    afterwards.

    A float16, bfloat16 or float64 model (transformers 5 keeps a checkpoint's dtype, e.g. the bundled float16
    reference models) is cast to float32 for the block and back afterwards, exactly (its weights are frozen; a float64
    model gets its own tensors back): the images are optimised in float32, as `quantize` runs them, whatever the dtype
    the model was loaded in. Swin blocks' window and shift sizes, which transformers shrinks in place on a forward
    pass at the model's native size, are restored too (see [`~models.adapters.window_sizes_kept`]).

    Args:
        model (`nn.Module`): the model.
        device (`str` or `torch.device`, *optional*): where to run; the model's own device if `None`.

    Returns:
        A context manager yielding the device the model is on inside it.

    Raises:
        `SynthesisError`: if the model's floating-point parameters mix dtypes (there is no one dtype to restore).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> with frozen_model(model):
        ...     model.training, model.weight.requires_grad
        (False, False)
        >>> model.training, model.weight.requires_grad
        (True, True)
    """
    original_device = next(model.parameters()).device
    target = torch.device(device) if device is not None else original_device
    dtypes = {parameter.dtype for parameter in model.parameters() if parameter.is_floating_point()}
    if len(dtypes) > 1:
        raise SynthesisError(f"The model's parameters mix dtypes {sorted(str(dtype) for dtype in dtypes)}; give it one "
                             "dtype (e.g. model.float()) before synthesis.")
    cast = bool(dtypes) and dtypes != {torch.float32}
    originals = [tensor.data for tensor in _tensors(model)] if cast else []  # given back as they were (float64 too)
    flags = [parameter.requires_grad for parameter in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if target != original_device:
        model.to(target)
    if cast:
        model.float()
    try:
        with eval_mode(model), window_sizes_kept(model):
            yield target
    finally:
        if target != original_device:
            model.to(original_device)
        for tensor, original in zip(_tensors(model), originals):  # a float32 buffer of a float16 model stays as is
            if tensor.dtype != original.dtype:
                tensor.data = original
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().cpu()


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.cat(tensors)
