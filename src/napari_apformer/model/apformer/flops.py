"""APFormer's FLOPs, from its sizes and the kept tokens.

FLOPs count the matrix products and convolutions the implementation runs (2 per
multiply-add), as torch.utils.flop_counter does; tests hold the two counts equal. Dependency
pruning zeroes attention weights but the product A'V stays dense, so it saves no FLOPs here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from napari_apformer.model.apformer.attention import PruningAttention

if TYPE_CHECKING:
    from napari_apformer.model.apformer.network import APFormer


def _conv_flops(conv: nn.Conv2d, size: int, in_channels: int | None = None) -> int:
    cin = conv.in_channels if in_channels is None else in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * conv.out_channels * cin * k * size * size


def _up_sizes(model: APFormer) -> tuple[tuple[nn.Module, int], ...]:
    size = model.input_size
    return ((model.up2, size // 4), (model.up3, size // 2), (model.up4, size))


def encoder_flops(model: APFormer) -> int:
    """CNN encoder, pruning head and the skip halves of the decoder's first convolutions."""
    size = model.input_size
    total = 0
    for block, side in (
        (model.inc, size),
        (model.down1.maxpool_conv[1], size // 2),
        (model.down2.maxpool_conv[1], size // 4),
        (model.down3.maxpool_conv[1], size // 8),
    ):
        total += _conv_flops(block.double_conv[0], side) + _conv_flops(block.double_conv[3], side)
    total += _conv_flops(model.trans4.pred_class, size // 8)
    for up, side in _up_sizes(model):
        total += _conv_flops(up.conv.double_conv[0], side, up.skip_channels)
    return total


def attention_flops(attention: PruningAttention, kept_tokens: int, tokens: int, width: int) -> int:
    """One attention layer with `kept_tokens` queries (nothing at all when none are kept)."""
    n, a = kept_tokens, attention
    if n == 0:
        return 0
    inner = a.heads * a.dim_head
    return (
        2 * tokens * width * 2 * inner  # keys and values for every token
        + 2 * n * width * inner  # queries of kept tokens
        + 2 * n * a.heads * a.dim_head  # dependency ratio w . q
        + 2 * 2 * a.heads * n * tokens * a.dim_head  # Q K^T and A' V
        + 2 * n * inner * width  # to_out
    )


def first_layer_flops(model: APFormer) -> int:
    """Layer 1's attention for every token, as cached for threshold changes."""
    width, tokens = model.widths[-1], model.tokens
    return 2 * tokens * width * width + attention_flops(
        model.trans4.attention_layers[0], tokens, tokens, width
    )


def decoder_flops(model: APFormer, kept_tokens: int, first_layer_reused: bool = False) -> int:
    """Transformer (attention for `kept_tokens` queries) and the rest of the decoder.

    first_layer_reused: layer 1's attention came from the cache (APFormer.add_first_layer).
    """
    trans, width, tokens = model.trans4, model.widths[-1], model.tokens
    total = 2 * tokens * width * width  # token embedding
    for depth, (attn, ffn) in enumerate(trans.transformer.layers):
        if not (depth == 0 and first_layer_reused):
            total += attention_flops(attn.fn, kept_tokens, tokens, width)
        hidden = ffn.fn.net[0].out_features
        total += 2 * 2 * tokens * width * hidden
    total += _conv_flops(model.conv4, model.input_size // 8)
    for up, side in _up_sizes(model):
        first = up.conv.double_conv[0]
        total += _conv_flops(first, side, first.in_channels - up.skip_channels)
        total += _conv_flops(up.conv.double_conv[3], side)
    total += _conv_flops(model.outc.conv, model.input_size)
    if model.pixel_head is not None:  # our pixel classification module: two 1x1 convolutions
        total += _conv_flops(model.pixel_head.net[0], model.input_size)
        total += _conv_flops(model.pixel_head.net[3], model.input_size)
    return total


def slice_flops(model: APFormer, kept_tokens: int) -> int:
    return encoder_flops(model) + decoder_flops(model, kept_tokens)
