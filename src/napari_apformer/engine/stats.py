"""What a run cost: FLOPs actually spent (from the kept tokens), kept fractions, time.

FLOPs count the matrix products and convolutions the implementation runs (2 per
multiply-add), as torch.utils.flop_counter does; tests hold the two counts equal. Dependency
pruning zeroes attention weights but the product A'V stays dense, so it saves no FLOPs here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from napari_apformer.model.apformer import INPUT_SIZE, TOKENS, APFormer
from napari_apformer.model.attention import PruningAttention


def _conv_flops(conv: nn.Conv2d, size: int, in_channels: int | None = None) -> int:
    cin = conv.in_channels if in_channels is None else in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * conv.out_channels * cin * k * size * size


def encoder_flops(model: APFormer) -> int:
    """CNN encoder, pruning head and the skip halves of the decoder's first convolutions."""
    total = 0
    for block, size in (
        (model.inc, INPUT_SIZE),
        (model.down1.maxpool_conv[1], INPUT_SIZE // 2),
        (model.down2.maxpool_conv[1], INPUT_SIZE // 4),
        (model.down3.maxpool_conv[1], INPUT_SIZE // 8),
    ):
        total += _conv_flops(block.double_conv[0], size) + _conv_flops(block.double_conv[3], size)
    total += _conv_flops(model.trans4.pred_class, INPUT_SIZE // 8)
    for up, size in (
        (model.up2, INPUT_SIZE // 4),
        (model.up3, INPUT_SIZE // 2),
        (model.up4, INPUT_SIZE),
    ):
        total += _conv_flops(up.conv.double_conv[0], size, up.skip_channels)
    return total


def attention_flops(attention: PruningAttention, kept_tokens: int, width: int) -> int:
    """One attention layer with `kept_tokens` queries (nothing at all when none are kept)."""
    n, a = kept_tokens, attention
    if n == 0:
        return 0
    inner = a.heads * a.dim_head
    return (
        2 * TOKENS * width * 2 * inner  # keys and values for every token
        + 2 * n * width * inner  # queries of kept tokens
        + 2 * n * a.heads * a.dim_head  # dependency ratio w . q
        + 2 * 2 * a.heads * n * TOKENS * a.dim_head  # Q K^T and A' V
        + 2 * n * inner * width  # to_out
    )


def first_layer_flops(model: APFormer) -> int:
    """Layer 1's attention for every token, as cached for threshold changes."""
    width = model.trans4.to_patch_embedding[1].in_features
    return 2 * TOKENS * width * width + attention_flops(
        model.trans4.attention_layers[0], TOKENS, width
    )


def decoder_flops(model: APFormer, kept_tokens: int, first_layer_reused: bool = False) -> int:
    """Transformer (attention for `kept_tokens` queries) and the rest of the decoder.

    first_layer_reused: layer 1's attention came from the cache (APFormer.add_first_layer).
    """
    trans = model.trans4
    width = trans.to_patch_embedding[1].in_features
    total = 2 * TOKENS * width * width  # token embedding
    for depth, (attn, ffn) in enumerate(trans.transformer.layers):
        if not (depth == 0 and first_layer_reused):
            total += attention_flops(attn.fn, kept_tokens, width)
        hidden = ffn.fn.net[0].out_features
        total += 2 * 2 * TOKENS * width * hidden
    total += _conv_flops(model.conv4, INPUT_SIZE // 8)
    for up, size in (
        (model.up2, INPUT_SIZE // 4),
        (model.up3, INPUT_SIZE // 2),
        (model.up4, INPUT_SIZE),
    ):
        first = up.conv.double_conv[0]
        total += _conv_flops(first, size, first.in_channels - up.skip_channels)
        total += _conv_flops(up.conv.double_conv[3], size)
    total += _conv_flops(model.outc.conv, INPUT_SIZE)
    return total


def slice_flops(model: APFormer, kept_tokens: int) -> int:
    return encoder_flops(model) + decoder_flops(model, kept_tokens)


@dataclass
class RunStats:
    """Totals over the slices of one run."""

    slices: int = 0
    kept_tokens: int = 0
    kept_dependencies: int = 0
    possible_dependencies: int = 0  # over kept queries: layers x heads x kept x tokens
    flops: int = 0
    flops_unpruned: int = 0
    encoder_cache_hits: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def kept_token_fraction(self) -> float:
        return self.kept_tokens / (self.slices * TOKENS) if self.slices else 0.0

    @property
    def kept_dependency_fraction(self) -> float:
        """Of the (query, key) pairs of kept queries, the fraction dependency pruning kept."""
        return (
            self.kept_dependencies / self.possible_dependencies
            if self.possible_dependencies
            else 0.0
        )

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gflops_unpruned(self) -> float:
        return self.flops_unpruned / 1e9

    @property
    def ms_per_slice(self) -> float:
        return 1000 * self.seconds / self.slices if self.slices else 0.0

    def summary(self) -> str:
        return (
            f"{self.slices} slice(s) on {self.device}: kept tokens "
            f"{100 * self.kept_token_fraction:.1f} %, kept dependencies "
            f"{100 * self.kept_dependency_fraction:.1f} %, {self.gflops:.1f} of "
            f"{self.gflops_unpruned:.1f} GFLOP, {self.ms_per_slice:.0f} ms per slice"
        )
