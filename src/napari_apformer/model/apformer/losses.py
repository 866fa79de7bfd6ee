"""Training losses of the spec: segmentation (Dice + CE), SSA, pruning head; weights 0.8/0.1/0.1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from napari_apformer.model.apformer.network import PATCH, ModelOutput
from napari_apformer.model.losses import soft_dice_loss

SEGMENTATION_WEIGHT, SSA_WEIGHT, HEAD_WEIGHT = 0.8, 0.1, 0.1


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice without background plus cross-entropy; target: (B, H, W) int64 labels."""
    return soft_dice_loss(logits, target) + F.cross_entropy(logits, target)


def token_target(target: torch.Tensor) -> torch.Tensor:
    """(B, 32, 32): 1 where any pixel of the token's 8 x 8 block is foreground."""
    foreground = (target > 0).to(torch.float32)[:, None]
    return (F.max_pool2d(foreground, PATCH)[:, 0] > 0).long()


def ssa_loss(content_attention: Sequence[torch.Tensor]) -> torch.Tensor:
    """Self-supervised self-attention loss on each layer's P = softmax(Q K^T / sqrt(D)).

    Rows should be sharp (normalised entropy at most 0.9) and P close to symmetric.
    """
    losses = []
    for p in content_attention:
        n = p.shape[-1]
        entropy = -(p * torch.log2(p + 1e-40)).sum(dim=-1) / math.log2(n)  # (B, H, N)
        entropy_loss = (10 * torch.clamp(entropy.amin(dim=-1) - 0.9, min=0)).mean()
        symmetry = F.smooth_l1_loss(n * p, n * p.transpose(-1, -2), beta=1.0)
        symmetry_loss = torch.clamp(symmetry, min=0.1)
        losses.append(0.8 * symmetry_loss + 0.2 * entropy_loss)
    return torch.stack(losses).mean()


def training_loss(
    output: ModelOutput, target: torch.Tensor, with_ssa: bool = True
) -> dict[str, torch.Tensor]:
    """All terms and their weighted total. With with_ssa (the spec), `output` must come from a
    forward with content_attention=True; without it the SSA term is left out (it costs as
    much as the rest of a CPU training step) and reported as 0."""
    seg = segmentation_loss(output.logits, target)
    head = segmentation_loss(output.token_logits, token_target(target))
    total = SEGMENTATION_WEIGHT * seg + HEAD_WEIGHT * head
    ssa = torch.zeros((), device=seg.device)
    if with_ssa:
        content = [t.content_attention for t in output.layers]
        if any(c is None for c in content):
            raise ValueError("training_loss needs the forward pass run with content_attention=True")
        ssa = ssa_loss(content)  # type: ignore[arg-type]
        total = total + SSA_WEIGHT * ssa
    return {"total": total, "segmentation": seg, "ssa": ssa, "head": head}
