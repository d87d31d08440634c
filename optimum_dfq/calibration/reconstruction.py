"""Block-wise reconstruction: tune each transformer block's weights to match the float model's block outputs.

The stage-2 backend of SARDFQ / DopQ-ViT as the research spec reconstructs it (I&S-ViT-like, section 3.3; the
papers' own settings are unverified). For every block of `adapter.blocks(model)`, in forward order:

* inputs: the block's call arguments in the *quantized* model (so the block learns to undo the error of the already
  quantized and reconstructed prefix); Swin's extra arguments (`input_dimensions`, ...) are captured and replayed;
* targets: the block's outputs in the *float* reference model on the same images;
* trainable: the float weights of the block's [`QLinear`] layers, seen through their weight quantizers with a
  straight-through estimator; every quantizer's scale and zero point stays frozen, LayerNorms and biases are fixed;
* loss `MSE(block_q(X_q), block_fp(X_fp))`, Adam (no weight decay), learning rate cosine-decayed to 0, minibatches of
  `batch_size` images drawn without replacement per step.

The tuned weights are kept only if they lower the block loss over the whole calibration set (otherwise the block is
restored), so reconstruction never makes a block worse on the data it sees.

Differences from I&S-ViT (spec section 3.3), all **our choices**: one stage on quantized weights and activations
(not I&S-ViT's three-stage smooth optimisation); the loss is the MSE rather than the L2 norm of the error; the patch
embedding, Swin's patch-merging reduction and the classifier, which I&S-ViT reconstructs as single layers, keep
their round-to-nearest weights; the default batch is 32 images (I&S-ViT: 64 of 1024) and is capped by the
calibration set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.utils.logging import is_progress_bar_enabled

from ..config import DFQConfig
from ..errors import DFQError
from ..models import get_adapter
from ..nn import QLinear
from .capture import BlockCalls, capture_block_calls, capture_block_outputs
from .data import CalibrationSet

logger = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """Outcome of reconstructing one block (MSE over the whole calibration set).

    Attributes:
        name (`str`): the block's module name.
        loss_before (`float`): block-output MSE against the float model before tuning.
        loss_after (`float`): the same MSE after reconstruction; equal to `loss_before` when the tuned weights were
            discarded (the tuned loss is then only logged).
        kept (`bool`): whether the tuned weights were kept (their loss was lower than `loss_before`).
    """

    name: str
    loss_before: float
    loss_after: float
    kept: bool


@torch.no_grad()
def _block_loss(block: nn.Module, calls: BlockCalls, targets: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for start in range(0, calls.num_images, batch_size):
        index = torch.arange(start, min(start + batch_size, calls.num_images))
        total += float(F.mse_loss(calls.replay(block, index), targets[index], reduction="sum"))
    return total / targets.numel()


def reconstruct_block(
    block: nn.Module, calls: BlockCalls, targets: torch.Tensor, iterations: int, lr: float, batch_size: int,
    seed: int = 0, name: str = "",
) -> BlockReport:
    """Tunes the weights of one block's [`QLinear`]s so that `block(calls)` matches `targets` (in place).

    Args:
        block (`nn.Module`): a quantized transformer block (calibrated quantizers, float weights).
        calls (`BlockCalls`): its inputs on the calibration images (from the quantized model).
        targets (`torch.Tensor`): the float model's block outputs on the same images.
        iterations (`int`), lr (`float`), batch_size (`int`): Adam steps, initial learning rate (cosine-decayed to 0)
            and images per step.
        seed (`int`): seed of the minibatch order.
        name (`str`): the block's name (for the report and logs).

    Returns:
        `BlockReport`: not kept, with the block unchanged, when the block has no quantized Linear.
    """
    linears = [m for m in block.modules() if isinstance(m, QLinear)]
    if any(linear.is_frozen for linear in linears):
        raise DFQError(f"Block {name}: its weights are frozen to integer codes; reconstruct before freezing.")
    weights = [linear.weight for linear in linears]
    saved = [w.detach().clone() for w in weights]
    grad_flags = {p: p.requires_grad for p in block.parameters()}
    batch_size = min(batch_size, calls.num_images)
    loss_before = _block_loss(block, calls, targets, batch_size)
    if not weights:  # every Linear of the block kept in float (`modules_to_not_convert`): nothing to tune
        logger.info("reconstruction %s: no quantized Linear, skipped (block MSE %.4e)", name, loss_before)
        return BlockReport(name, loss_before, loss_before, False)

    for p in block.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in tqdm(range(iterations), desc=f"reconstruct {name}", leave=False,
                          disable=not is_progress_bar_enabled()):
                index = torch.randperm(calls.num_images, generator=generator)[:batch_size]
                loss = F.mse_loss(calls.replay(block, index), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for w in weights:
            w.grad = None

    loss_after = _block_loss(block, calls, targets, batch_size)
    kept = loss_after < loss_before
    if not kept:
        with torch.no_grad():
            for w, original in zip(weights, saved):
                w.copy_(original)
    logger.info("reconstruction %s: block MSE %.4e -> %.4e%s", name, loss_before, loss_after,
                "" if kept else " (not kept)")
    return BlockReport(name, loss_before, loss_after if kept else loss_before, kept)


def reconstruct_blocks(
    model: nn.Module, float_model: nn.Module, calibration: CalibrationSet, config: DFQConfig
) -> list[BlockReport]:
    """Reconstructs every transformer block of a calibrated quantized model, in forward order (in place).

    Args:
        model (`PreTrainedModel`): the calibrated quantized model (weights not frozen yet).
        float_model (`PreTrainedModel`): the float reference, with the same module names (its blocks give the
            targets).
        calibration (`CalibrationSet`): the calibration images.
        config (`DFQConfig`): `config.reconstruction` holds `iterations`, `lr` and `batch_size`; `config.seed`
            seeds the minibatch order.

    Returns:
        `list[BlockReport]`, one per block.

    Example:

    ```python
    >>> cfg = DFQConfig(bits="w4a4", reconstruction={"iterations": 100})  # doctest: +SKIP
    >>> reports = reconstruct_blocks(qmodel, float_model, calibration, cfg)  # doctest: +SKIP
    ```
    """
    options = config.reconstruction
    if not options:
        return []
    batches = calibration.batches(config.calibration_batch_size)
    reports = []
    blocks = get_adapter(model).blocks(model)
    for i, (name, block) in enumerate(tqdm(blocks, desc="block reconstruction", leave=False,
                                           disable=not is_progress_bar_enabled())):
        calls = capture_block_calls(model, block, batches)
        targets = capture_block_outputs(float_model, float_model.get_submodule(name), batches)
        reports.append(reconstruct_block(block, calls, targets, options["iterations"], options["lr"],
                                         options["batch_size"], seed=config.seed + i, name=name))
    return reports
