"""Activation correction: our interpretation of DFQ-ViT's activation correction matrix (ACM).

**OUR INTERPRETATION, unverified.** DFQ-ViT (arXiv 2507.14481) aligns the intermediate activations of the quantized
model with those of the float model through an "activation correction matrix" fitted during calibration and used at
inference; its shape, placement and fit are not public. Following the library's research spec (sections 4.4, 10.4):

* **Sites**: the inputs of chosen Linear layers, selected by role (`qkv`, `o_proj`, `fc1`, `fc2`, `reduction`,
  `classifier`, see [`~calibration.sites`]). q, k and v share one site when they read one quantized LayerNorm output.
* **Where it sits**: on the *dequantized* input, right before the matmul, i.e. after the site's input quantizer
  (the LayerNorm's output quantizer for q/k/v and fc1, the Linear's own input quantizer for o_proj/fc2). It
  therefore maps exactly what the Linear multiplies, `X_q = Q(x)`, to the float model's input `X_fp` at the same site,
  and nothing sits between it and the weight, which is what makes folding exact:
  `W (a⊙x + c) + b = (W·diag(a)) x + (b + W c)`.
* **Kinds**: `"affine"`, a per-channel `x ← a⊙x + c` fitted in closed form (per-channel least squares, or moment
  matching `a = σ_fp/σ_q`); folded into the next Linear by default (zero inference cost). `"ridge"`, a full matrix
  `x ← x M + β` fitted by ridge regression towards the identity (`ridge_fit: direct`: the library spec's plain
  ridge regression, towards 0, without bias), kept as a module ([`RidgeCorrection`], its
  parameters are buffers in the `state_dict`); costs one `D×D` matmul per token (folding is possible too,
  `fold: true`).
* **Fold order**: the fold changes the *float* weight, then the Linear's weight quantizer is re-calibrated on the
  folded weight (quantizing first and scaling after would leave the grid off the new weight).
* **Fitting**: sites are fitted one after another in forward order on the calibration images, each on the
  activations of the quantized model with every earlier correction already applied; targets come from the float
  reference model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils.logging import is_progress_bar_enabled

from ..config import DFQConfig
from ..errors import DFQError
from ..models import get_adapter
from ..nn import QLinear
from .capture import capture_matmul_inputs
from .data import CalibrationSet
from .sites import LinearGroup, linear_groups, linear_roles

logger = logging.getLogger(__name__)


class AffineCorrection(nn.Module):
    """Per-channel affine correction `x ← scale ⊙ x + shift` on the last dimension (the identity when created).

    `scale` and `shift` are buffers (saved in the `state_dict`, not trained); [`fit_affine`] sets them.

    Args:
        channels (`int`): size of the last dimension.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.calibration import AffineCorrection
    >>> correction = AffineCorrection(4)
    >>> x = torch.randn(2, 5, 4)
    >>> torch.equal(correction(x), x), sorted(correction.state_dict())
    (True, ['scale', 'shift'])
    >>> correction.as_linear_map()[0].shape  # the equivalent diagonal matrix
    torch.Size([4, 4])
    ```
    """

    kind = "affine"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def as_linear_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(M, β)` with `correction(x) = x @ M + β`."""
        return torch.diag(self.scale), self.shift


class RidgeCorrection(nn.Module):
    """Full-matrix correction `x ← x @ matrix + bias` on the last dimension (the identity when created).

    `matrix` (`[channels, channels]`) and `bias` are buffers (saved in the `state_dict`, not trained); [`fit_ridge`]
    sets them.

    Args:
        channels (`int`): size of the last dimension.

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.calibration import RidgeCorrection
    >>> correction = RidgeCorrection(4)
    >>> x = torch.randn(2, 5, 4)
    >>> torch.equal(correction(x), x), sorted(correction.state_dict())
    (True, ['bias', 'matrix'])
    ```
    """

    kind = "ridge"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.eye(channels))
        self.register_buffer("bias", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype) + self.bias.to(x.dtype)

    def as_linear_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(M, β)` with `correction(x) = x @ M + β`."""
        return self.matrix, self.bias


CORRECTION_MODULES: dict[str, type[nn.Module]] = {"affine": AffineCorrection, "ridge": RidgeCorrection}


@dataclass
class CorrectionRecord:
    """What the correction did at one site, as returned by [`correct_activations`].

    The MSEs are measured on the token rows used for fitting (about `max_tokens` rows subsampled from the calibration
    images), at the site's first Linear, between what its matmul multiplies in the quantized and in the float model.

    Attributes:
        role (`str`): the Linears' role (`"qkv"`, `"o_proj"`, `"fc1"`, `"fc2"`, `"reduction"` or `"classifier"`).
        linears (`tuple[str, ...]`): names of the Linears that read the corrected tensor (q, k and v together when
            they share their input).
        mse_before (`float`): activation MSE without the correction.
        mse_after (`float`): activation MSE with the correction applied.
        kind (`str`): `"affine"` or `"ridge"`.
        folded (`bool`): whether the correction was folded into the Linears' weights and biases (otherwise it is
            attached to each of them as `input_correction`).
    """

    role: str
    linears: tuple[str, ...]
    mse_before: float
    mse_after: float
    kind: str
    folded: bool


# ---------------------------------------------------------------------------------------------- fitting
def fit_affine(x_q: torch.Tensor, x_fp: torch.Tensor, method: str = "least_squares") -> AffineCorrection:
    """Fits `a⊙x_q + c ≈ x_fp` per channel in closed form.

    Args:
        x_q (`torch.Tensor`): `[rows, channels]` quantized-model activations.
        x_fp (`torch.Tensor`): `[rows, channels]` float-model activations at the same positions.
        method (`str`): `"least_squares"` (`a = cov(x_q, x_fp) / var(x_q)`, the per-channel MSE optimum) or
            `"moments"` (`a = σ_fp / σ_q`, matching mean and standard deviation).

    Returns:
        `AffineCorrection`: `c = μ_fp − a μ_q`; channels with (near-)constant `x_q` keep `a = 1`.
    """
    x_q, x_fp = x_q.double(), x_fp.double()
    mean_q, mean_fp = x_q.mean(0), x_fp.mean(0)
    var_q = (x_q - mean_q).pow(2).mean(0)
    if method == "least_squares":
        scale = ((x_q - mean_q) * (x_fp - mean_fp)).mean(0) / var_q
    elif method == "moments":
        scale = (x_fp - mean_fp).pow(2).mean(0).sqrt() / var_q.sqrt()
    else:
        raise ValueError(f"Unknown affine fit {method!r}; expected 'least_squares' or 'moments'.")
    degenerate = var_q <= 1e-12 * var_q.mean().clamp(min=1e-30)
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    correction = AffineCorrection(x_q.shape[-1])
    correction.scale.copy_(scale.float())
    correction.shift.copy_((mean_fp - scale * mean_q).float())
    return correction


def fit_ridge(
    x_q: torch.Tensor, x_fp: torch.Tensor, ridge_lambda: float = 1e-2, fit: str = "residual"
) -> RidgeCorrection:
    """Fits `x_q M + β ≈ x_fp` by ridge regression.

    * `fit="residual"` (default; our interpretation): ridge regression of the residual, i.e. shrinking `M` towards
      the identity, `M = I + (X̃_qᵀX̃_q + λ' I)⁻¹ X̃_qᵀ (X̃_fp − X̃_q)` on centred data, `β = μ_fp − μ_q M`. A strong
      ridge then leaves the activations as they are (plus a mean shift) instead of shrinking them to 0.
    * `fit="direct"`: the library spec's `M = (X_qᵀX_q + λ' I)⁻¹ X_qᵀ X_fp` on the raw activations, `β = 0`.

    In both, `λ' = λ · tr(G) / D` with `G` the Gram matrix used (so `λ` is relative to the mean input energy and
    does not depend on the activation scale).

    Args:
        x_q (`torch.Tensor`), x_fp (`torch.Tensor`): `[rows, channels]` activations, as in [`fit_affine`].
        ridge_lambda (`float`): relative ridge strength (> 0).
        fit (`str`, *optional*, defaults to `"residual"`): `"residual"` or `"direct"`, as above.

    Returns:
        `RidgeCorrection`

    Example:

    ```python
    >>> import torch
    >>> from optimum_dfq.calibration.correction import fit_ridge
    >>> x_q = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    >>> torch.allclose(fit_ridge(x_q, 2 * x_q, 1e-9, fit="direct").matrix, 2 * torch.eye(4), atol=1e-5)
    True
    ```
    """
    if fit not in ("residual", "direct"):
        raise ValueError(f"fit={fit!r} must be 'residual' or 'direct'.")
    x_q, x_fp = x_q.double(), x_fp.double()
    if fit == "direct":
        mean_q = mean_fp = torch.zeros(x_q.shape[1], dtype=x_q.dtype)
    else:
        mean_q, mean_fp = x_q.mean(0), x_fp.mean(0)
    centred = x_q - mean_q
    gram = centred.T @ centred
    channels = gram.shape[0]
    damping = ridge_lambda * gram.trace().clamp(min=1e-30) / channels
    eye = torch.eye(channels, dtype=gram.dtype)
    if fit == "direct":
        matrix = torch.linalg.solve(gram + damping * eye, centred.T @ x_fp)
    else:
        matrix = eye + torch.linalg.solve(gram + damping * eye, centred.T @ ((x_fp - mean_fp) - centred))
    correction = RidgeCorrection(channels)
    correction.matrix.copy_(matrix.float())
    correction.bias.copy_((mean_fp - mean_q @ matrix).float())
    return correction


def fit_correction(x_q: torch.Tensor, x_fp: torch.Tensor, options: dict) -> nn.Module:
    """Fits the correction described by `DFQConfig.correction` options (`kind`, `affine_fit`, `ridge_lambda`,
    `ridge_fit`)."""
    if options["kind"] == "affine":
        return fit_affine(x_q, x_fp, options["affine_fit"])
    return fit_ridge(x_q, x_fp, options["ridge_lambda"], options.get("ridge_fit", "residual"))


# ---------------------------------------------------------------------------------------------- folding
@torch.no_grad()
def fold_correction(linear: QLinear, correction: nn.Module, recalibrate_weights: bool = True) -> None:
    """Folds a correction that precedes `linear` into its float weight and bias (in place).

    `F.linear(x M + β, W, b) = F.linear(x, W Mᵀ, b + W β)`; a zero bias is created first if the layer has none. The
    weight quantizer is then re-calibrated on the folded float weight (unless `recalibrate_weights=False`). The
    correction module itself is not attached to `linear`.

    Args:
        linear (`QLinear`): the consumer (its weight must still be float, not frozen).
        correction (`AffineCorrection` or `RidgeCorrection`): the fitted correction (any module with an
            `as_linear_map()` method returning `(M, β)`).
        recalibrate_weights (`bool`, *optional*, defaults to `True`): re-calibrate the weight quantizer afterwards.

    Raises:
        `DFQError`: when the weight of `linear` is frozen to integer codes.

    Example:

    ```python
    >>> from torch import nn
    >>> from optimum_dfq.calibration import AffineCorrection, fold_correction
    >>> from optimum_dfq.nn import QLinear
    >>> from optimum_dfq.quantizers import build_quantizer
    >>> linear = QLinear.from_float(nn.Linear(4, 3, bias=False), build_quantizer("uniform", bits=8, channels=3, axis=0),
    ...                             None, "fc")
    >>> correction = AffineCorrection(4)
    >>> correction.shift[:] = 0.5
    >>> fold_correction(linear, correction)
    >>> linear.bias is not None, bool(linear.weight_quantizer.calibrated)
    (True, True)
    ```
    """
    if linear.is_frozen:
        raise DFQError(
            f"{linear.weight_quantizer.site}: the weight is frozen to integer codes, so a correction cannot be folded "
            "into it; fit corrections during quantize() (DFQConfig.correction), before the model is frozen."
        )
    matrix, shift = (t.double() for t in correction.as_linear_map())
    weight = linear.weight.double()
    bias = linear.ensure_bias()
    bias.copy_((bias.double() + weight @ shift).to(bias.dtype))
    linear.weight.copy_((weight @ matrix.T).to(linear.weight.dtype))
    if recalibrate_weights:
        linear.calibrate_weights()


# ---------------------------------------------------------------------------------------------- pipeline
def correction_groups(model: nn.Module, sites: list[str], probe: torch.Tensor) -> list[LinearGroup]:
    """The correction sites of `model` for the roles in `sites`, in forward order."""
    return linear_groups(model, linear_roles(model, get_adapter(model), probe), sites)


def correct_activations(
    model: nn.Module, float_model: nn.Module, calibration: CalibrationSet, config: DFQConfig
) -> list[CorrectionRecord]:
    """Fits (and folds or attaches) an activation correction at every configured site of a calibrated model.

    Args:
        model (`PreTrainedModel`): the calibrated quantized model (modified in place; weights not frozen yet).
        float_model (`PreTrainedModel`): the float reference with the same module names (e.g. a copy of `model`
            with every quantizer off, taken after re-parameterisation so both share one parameterisation).
        calibration (`CalibrationSet`): the calibration images.
        config (`DFQConfig`): `config.correction` holds the options (see [`DFQConfig`]).

    Returns:
        `list[CorrectionRecord]`, one per site.

    Example:

    ```python
    >>> cfg = DFQConfig(bits="w3a8", correction={"kind": "affine", "sites": ["fc1", "fc2"]})  # doctest: +SKIP
    >>> records = correct_activations(qmodel, float_model, calibration, cfg)  # doctest: +SKIP
    ```
    """
    options = config.correction
    if not options:
        return []
    batches = calibration.batches(config.calibration_batch_size)
    groups = correction_groups(model, options["sites"], calibration.pixel_values[:1])
    records = []
    for group in tqdm(groups, desc="activation correction", leave=False, disable=not is_progress_bar_enabled()):
        site = group.names[0]
        x_fp = capture_matmul_inputs(float_model, [site], batches, options["max_tokens"], stop_after=site)[site]
        x_q = capture_matmul_inputs(model, [site], batches, options["max_tokens"], stop_after=site)[site]
        correction = fit_correction(x_q, x_fp, options)
        with torch.no_grad():
            before = float((x_q - x_fp).pow(2).mean())
            after = float((correction(x_q) - x_fp).pow(2).mean())
        for i, name in enumerate(group.names):
            linear = model.get_submodule(name)
            if options["fold"]:
                fold_correction(linear, correction)
            else:  # q, k and v get their own copy: shared tensors would break safetensors checkpoints
                linear.input_correction = correction if i == 0 else copy.deepcopy(correction)
        records.append(CorrectionRecord(group.role, group.names, before, after, options["kind"], options["fold"]))
        logger.info("correction %s (%s): activation MSE %.3e -> %.3e", site, group.role, before, after)
    return records


def correction_layout(records: list[CorrectionRecord]) -> dict[str, str]:
    """The structure the corrections gave the model: Linear name → `"folded"` or the attached module's kind.

    This is what a checkpoint must record to rebuild the model's layout before loading (see
    [`attach_corrections`]); `quantize_model` stores it as `QuantizationPlan.corrections`.
    """
    return {name: "folded" if r.folded else r.kind for r in records for name in r.linears}


def attach_corrections(model: nn.Module, layout: dict[str, str]) -> None:
    """Rebuilds the structure described by [`correction_layout`] with identity values, ready to be filled from a
    checkpoint (in place).

    A Linear marked `"folded"` gets a zero bias if it has none; a Linear marked `"affine"` or `"ridge"` gets an
    identity [`AffineCorrection`] or [`RidgeCorrection`] as its `input_correction` (on its weight quantizer's
    device), replacing any correction it had. Checkpoint loading calls this with the saved
    `QuantizationPlan.corrections`.

    Args:
        model (`nn.Module`): a quantized model.
        layout (`dict[str, str]`): [`QLinear`] name → `"folded"`, `"affine"` or `"ridge"`.

    Raises:
        `KeyError`: when a kind is none of the three.
        `AttributeError`: when a name is not a submodule of `model`.

    Example:

    ```python
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from optimum_dfq import DataFreeViTQuantizer
    >>> from optimum_dfq.calibration import attach_corrections
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    ...                                             num_attention_heads=2, intermediate_size=64, num_labels=10))
    >>> qmodel = DataFreeViTQuantizer().quantize(model, bits="w4a4", synthesizer="gaussian", num_images=4)
    >>> attach_corrections(qmodel, {"classifier": "ridge"})
    >>> type(qmodel.classifier.input_correction).__name__
    'RidgeCorrection'
    ```
    """
    for name, kind in layout.items():
        linear = model.get_submodule(name)
        if kind == "folded":
            linear.ensure_bias()
        else:
            device = linear.weight_quantizer.scale.device
            linear.input_correction = CORRECTION_MODULES[kind](linear.in_features).to(device)
