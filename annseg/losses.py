"""Losses: OHEM cross-entropy on the main output plus weighted auxiliary cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _class_weights(weights: Sequence[float] | Tensor | None) -> Tensor | None:
    if weights is None:
        return None
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() != 1 or not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"class_weights must be a 1-D sequence of finite non-negative numbers, got {weights}")
    return weights


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only (online hard example mining).

    Per valid pixel, p = predicted probability of its true class. Pixels with
    p <= max(threshold, the min_kept-th smallest p) are kept; the loss is their (class-weighted)
    mean. So at least ``min_kept`` pixels count, and more when many are hard. Over the whole
    batch, as in the authors' code. A batch with no valid pixel gives a zero loss, not NaN.

    Args:
        threshold: probability under which a pixel is hard (0.7).
        min_kept: least number of pixels kept (100000); all valid pixels when fewer.
        ignore_index: label of pixels that never count (255).
        class_weights: optional per-class weights (Cityscapes uses 19).
    """

    def __init__(
        self,
        threshold: float = 0.7,
        min_kept: int = 100_000,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if min_kept < 0:
            raise ValueError(f"min_kept must be >= 0, got {min_kept}")
        self.threshold = threshold
        self.min_kept = min_kept
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", _class_weights(class_weights), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B, K, H, W), target (B, H, W) of class ids or ``ignore_index``."""
        nll = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")
        valid = target != self.ignore_index
        if not valid.any():
            return logits.float().sum() * 0.0  # keeps the graph: backward gives zero gradients
        with torch.no_grad():
            prob = torch.exp(-nll)  # probability of the true class (1 at ignored pixels)
            threshold = self.threshold
            if self.min_kept > 0:
                valid_prob = prob[valid]
                k = min(self.min_kept, valid_prob.numel())
                threshold = max(threshold, valid_prob.kthvalue(k).values.item())
            kept = valid & (prob <= threshold)
        weight = kept.float()
        if self.class_weights is not None:
            weight = weight * self.class_weights[target.clamp(max=len(self.class_weights) - 1)]
        return (nll * weight).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)


class ANNLoss(nn.Module):
    """OHEM cross-entropy on the main logits + ``aux_weight`` x cross-entropy on the auxiliary ones."""

    def __init__(
        self,
        aux_weight: float = 0.4,
        threshold: float = 0.7,
        min_kept: int = 100_000,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
        ohem: bool = True,
    ) -> None:
        super().__init__()
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        # Without OHEM: threshold 1 and min_kept 0 keep every valid pixel (plain cross-entropy).
        self.main = OhemCrossEntropy(threshold if ohem else 1.0, min_kept if ohem else 0, ignore_index, class_weights)

    def forward(self, outputs: Tensor | tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        """``outputs``: main logits, or (main, aux) as the network returns in training mode."""
        main, aux = (outputs, None) if isinstance(outputs, Tensor) else outputs
        loss = self.main(main, target)
        if aux is not None and self.aux_weight:
            if (target != self.ignore_index).any():
                aux_loss = F.cross_entropy(aux.float(), target, weight=self.main.class_weights, ignore_index=self.ignore_index)
            else:
                aux_loss = aux.float().sum() * 0.0
            loss = loss + self.aux_weight * aux_loss
        return loss
