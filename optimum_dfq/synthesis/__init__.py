"""Calibration-image synthesizers (data-free calibration sources), selectable by name.

`"gaussian"` draws noise; `"psaq"`, `"sardfq"` and `"dfq-vit"` optimise pixels against the float model with one
shared engine ([`optimize_batch`]). Calibration sets convert to and from `datasets.Dataset`s.
"""

from .base import SYNTHESIZERS, Synthesizer, get_synthesizer, register_synthesizer
from .context import BatchPlan, BatchRecord, StepContext
from .dataset import (
    calibration_set_from_dataset_dict,
    calibration_set_to_dataset,
    load_calibration_set,
    save_calibration_set,
)
from .dfq_vit import DFQViTSynthesizer
from .engine import (
    BatchCheckpointer,
    BatchResult,
    EngineConfig,
    EngineState,
    SynthesisTerminated,
    optimize_batch,
)
from .gaussian import GaussianSynthesizer, image_generator
from .geometry import TokenGrid, probe_token_grids, roll_and_flip_maps
from .losses import (
    AttentionPriorTerm,
    CrossEntropyTerm,
    DisagreementTerm,
    LossTerm,
    PatchSimilarityEntropyTerm,
    PhaseRamp,
    SoftLabelTerm,
    TotalVariationTerm,
)
from .pixel_synthesizer import ModelInfo, PixelSynthesizer
from .provisional import synthesizer_from_config
from .psaq import PSAQSynthesizer
from .sardfq import SARDFQSynthesizer
from .seeding import stream_generator
from .visualize import save_image_grid

__all__ = [
    "SYNTHESIZERS",
    "AttentionPriorTerm",
    "BatchCheckpointer",
    "BatchPlan",
    "BatchRecord",
    "BatchResult",
    "CrossEntropyTerm",
    "DFQViTSynthesizer",
    "DisagreementTerm",
    "EngineConfig",
    "EngineState",
    "GaussianSynthesizer",
    "LossTerm",
    "ModelInfo",
    "PSAQSynthesizer",
    "PatchSimilarityEntropyTerm",
    "PhaseRamp",
    "PixelSynthesizer",
    "SARDFQSynthesizer",
    "SoftLabelTerm",
    "StepContext",
    "SynthesisTerminated",
    "Synthesizer",
    "TokenGrid",
    "TotalVariationTerm",
    "calibration_set_from_dataset_dict",
    "calibration_set_to_dataset",
    "get_synthesizer",
    "image_generator",
    "load_calibration_set",
    "optimize_batch",
    "probe_token_grids",
    "register_synthesizer",
    "roll_and_flip_maps",
    "save_calibration_set",
    "save_image_grid",
    "stream_generator",
    "synthesizer_from_config",
]
