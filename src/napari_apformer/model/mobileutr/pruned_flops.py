"""mobileutr-ap's FLOPs per image from its modules, the input size and the kept tokens, as
torch.utils.flop_counter counts them (tests hold the two equal); see flops.py for what counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_apformer.model.mobileutr import flops
from napari_apformer.model.mobileutr.pruned_stage import block_flops

if TYPE_CHECKING:
    from napari_apformer.model.mobileutr.pruned_network import MobileUtrAP


def _at(height: int, width: int) -> dict[int, tuple[int, int]]:
    return {s: (height // s, width // s) for s in (1, 2, 4, 8)}


def encoder_flops(model: MobileUtrAP, height: int, width: int) -> int:
    """Patch embedding, LGL stage, expend_dims and the pruning head (`encode`)."""
    embed, at = model.patch_embeddings, _at(height, width)
    total = flops.convs_flops(embed.stem, *at[1]) + flops.convs_flops(embed.layer1, *at[1])
    total += flops.convs_flops(embed.layer2, *at[2]) + flops.convs_flops(embed.layer3, *at[4])
    for block in model.lklgl_bottleneck:
        total += flops.block_flops(block, *at[8])
    total += flops.convs_flops(model.expend_dims, *at[8])
    return total + flops.conv_flops(model.pred_class, *at[8])


def decoder_flops(model: MobileUtrAP, height: int, width: int, kept_tokens: int) -> int:
    """The pruned transformer stage with `kept_tokens` kept queries and the decoder
    (`decode`)."""
    at = _at(height, width)
    total = sum(block_flops(b, *at[8], kept_tokens) for b in model.transformer_bottleneck)
    for module, scale in (
        (model.reduce_dims, 8),
        (model.Up_conv4, 8),
        (model.Up3, 4),
        (model.Up_conv3, 4),
        (model.Up2, 2),
        (model.Up_conv2, 2),
        (model.Up1, 1),
        (model.head, 1),
    ):
        total += flops.convs_flops(module, *at[scale])
    return total


def image_flops(model: MobileUtrAP, height: int, width: int, kept_tokens: int) -> int:
    return encoder_flops(model, height, width) + decoder_flops(model, height, width, kept_tokens)
