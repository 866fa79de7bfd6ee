"""MobileUtr's FLOPs per image from its modules and the input size.

As torch.utils.flop_counter counts them (tests hold the two equal): 2 per multiply-add of
every convolution, transposed convolution, linear layer and attention matrix product; none
for normalisation, activations, pooling, upsampling, softmax or additions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from napari_apformer.model.mobileutr.blocks import GlobalSparseAttn, LGLBlock

if TYPE_CHECKING:
    from napari_apformer.model.mobileutr.network import MobileUtr


def conv_flops(conv: nn.Conv2d | nn.ConvTranspose2d, rows: int, cols: int) -> int:
    """A convolution whose output (transposed: input) is rows x cols."""
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(conv, nn.ConvTranspose2d):
        return 2 * rows * cols * kernel * conv.in_channels * (conv.out_channels // conv.groups)
    return 2 * rows * cols * kernel * conv.out_channels * (conv.in_channels // conv.groups)


def convs_flops(module: nn.Module, rows: int, cols: int) -> int:
    """Every Conv2d in `module`, all run at rows x cols."""
    return sum(conv_flops(m, rows, cols) for m in module.modules() if isinstance(m, nn.Conv2d))


def linear_flops(linear: nn.Linear, tokens: int) -> int:
    return 2 * tokens * linear.in_features * linear.out_features


def attention_flops(attn: GlobalSparseAttn, rows: int, cols: int) -> int:
    """GlobalSparseAttn on a rows x cols map."""
    tokens = rows * cols
    sampled_rows, sampled_cols = rows // attn.sample, cols // attn.sample
    n = sampled_rows * sampled_cols
    scores_and_values = 2 * n * n * (attn.qk_width + attn.v_width)  # Q K^T, then A V
    total = linear_flops(attn.qkv, n) + scores_and_values + linear_flops(attn.proj, tokens)
    if attn.sample > 1:
        total += conv_flops(attn.LocalProp, sampled_rows, sampled_cols)
    return total


def block_flops(block: LGLBlock, rows: int, cols: int) -> int:
    total = convs_flops(block.LocalAgg, rows, cols)  # none where it is the identity
    sa = block.SelfAttn
    tokens = rows * cols
    total += conv_flops(sa.pos_embed, rows, cols) + attention_flops(sa.attn, rows, cols)
    return total + linear_flops(sa.mlp.fc1, tokens) + linear_flops(sa.mlp.fc2, tokens)


def image_flops(model: MobileUtr, height: int, width: int) -> int:
    """One image of height x width (multiples of 16)."""
    embed = model.patch_embeddings
    at = {s: (height // s, width // s) for s in (1, 2, 4, 8)}
    total = convs_flops(embed.stem, *at[1]) + convs_flops(embed.layer1, *at[1])
    total += convs_flops(embed.layer2, *at[2]) + convs_flops(embed.layer3, *at[4])
    for block in (*model.lklgl_bottleneck, *model.transformer_bottleneck):
        total += block_flops(block, *at[8])
    for module, scale in (
        (model.expend_dims, 8),
        (model.reduce_dims, 8),
        (model.Up_conv4, 8),
        (model.Up3, 4),
        (model.Up_conv3, 4),
        (model.Up2, 2),
        (model.Up_conv2, 2),
        (model.Up1, 1),
        (model.head, 1),
    ):
        total += convs_flops(module, *at[scale])
    return total
