"""MobileUtr (Tang et al., "MobileUtr: Revisiting the relationship between light-weight CNN and
Transformer for efficient medical image segmentation", arXiv 2312.01740; the same network as
the 2-D Mobile U-ViT, ACM MM 2025): a ConvUtr patch embedding down to 1/4, an LGL stage and a
transformer stage at 1/8, and a cascaded decoder with max-pooled skips.

Variants: "default" (MobileUtr) and "L" (MobileUtr-L). Spec: shared/spec/mobileutr.md. Unlike
the release, the input is taken as it is: no hidden 1 -> 3 channel replication.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_apformer.errors import InputError
from napari_apformer.model.base import InputRule, Prediction, SegmentationModel
from napari_apformer.model.losses import soft_dice_loss
from napari_apformer.model.mobileutr import search as mobileutr_search
from napari_apformer.model.mobileutr.blocks import (
    LGL_DROP_PATH,
    SAMPLE,
    BlockSizes,
    ConvBlock,
    Embeddings,
    LGLBlock,
    UpConv,
)

MULTIPLE = 16  # three 2x max-pools, then the LGL stage's 2 x 2 sampling
PATCH = 8  # one bottleneck token per 8 x 8 input pixels
# Stages whose block counts `depths` holds, in order (release names).
STAGES = (
    "patch_embeddings.layer1",
    "patch_embeddings.layer2",
    "patch_embeddings.layer3",
    "lklgl_bottleneck",
    "transformer_bottleneck",
)

CROSS_ENTROPY_WEIGHT, DICE_WEIGHT = 0.3, 0.7  # U-Bench multi-class recipe


class MobileUtr(SegmentationModel):
    """MobileUtr for `in_channels` input channels and `n_classes` classes.

    dims: the four widths (embedding stages 1-3 and the transformer stage; the LGL stage runs
    at dims[2]); depths: ConvUtr repeats of embedding stages 1-3, LGL blocks, transformer
    blocks; kernels: the depthwise kernels of embedding stages 1-3; heads: attention heads of
    both bottleneck stages (the release's embed_dim // 64).
    """

    family = "mobileutr"
    variants: ClassVar = {  # heads: the release's embed_dim // 64 (256 and 512)
        "default": {
            "dims": [16, 32, 64, 128],
            "depths": [1, 1, 3, 3, 3],
            "kernels": [3, 3, 7],
            "heads": 4,
        },
        "L": {
            "dims": [32, 64, 128, 256],
            "depths": [1, 1, 3, 3, 4],
            "kernels": [3, 3, 7],
            "heads": 8,
        },
    }

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 4,
        dims: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (1, 1, 3, 3, 3),
        kernels: Sequence[int] = (3, 3, 7),
        heads: int = 4,
        variant: str = "default",
        blocks: Sequence[BlockSizes] | None = None,
    ) -> None:
        super().__init__(in_channels, n_classes, variant)
        self.dims, self.depths, self.kernels = list(dims), list(depths), list(kernels)
        self.heads = heads
        d0, d1, d2, d3 = self.dims
        self.block_sizes = list(blocks) if blocks is not None else self.release_blocks()
        if len(self.block_sizes) != self.depths[3] + self.depths[4]:
            raise ValueError("one BlockSizes per LGL and transformer block")
        lgl, transformer = self.block_sizes[: self.depths[3]], self.block_sizes[self.depths[3] :]
        self.patch_embeddings = Embeddings(in_channels, self.dims, self.depths, self.kernels)
        self.lklgl_bottleneck = nn.ModuleList(
            LGLBlock(d2, heads, SAMPLE, LGL_DROP_PATH, sizes) for sizes in lgl
        )
        self.transformer_bottleneck = nn.ModuleList(
            LGLBlock(d3, heads, 1, sizes=sizes) for sizes in transformer
        )
        self.expend_dims = ConvBlock(d2, d3)
        self.reduce_dims = ConvBlock(d3, d2)
        self.Up_conv4 = ConvBlock(2 * d2, d2)
        self.Up3 = UpConv(d2, d1)
        self.Up_conv3 = ConvBlock(2 * d1, d1)
        self.Up2 = UpConv(d1, d0)
        self.Up_conv2 = ConvBlock(2 * d0, d0)
        self.Up1 = UpConv(d0, d0)
        self.head = nn.Conv2d(d0, n_classes, 1)
        # Channels-last convolutions (depth-wise and large kernels most) run faster on the CPU
        # (docs/models.md); loading a state_dict and moving devices keep this layout.
        self.to(memory_format=torch.channels_last)

    # -- the family interface ----------------------------------------------------------------
    @property
    def input_rule(self) -> InputRule:
        return InputRule(multiple=MULTIPLE)

    def release_blocks(self) -> list[BlockSizes]:
        """The release's inner widths of every bottleneck block, LGL blocks first."""
        return [BlockSizes.release(self.dims[2], self.heads)] * self.depths[3] + [
            BlockSizes.release(self.dims[3], self.heads)
        ] * self.depths[4]

    def sizes(self) -> dict[str, Any]:
        """The release's sizes; "blocks" (each bottleneck block's inner widths) only where
        they are not the release's, so release-shaped cards stay as they were."""
        sizes: dict[str, Any] = {
            "dims": list(self.dims),
            "depths": list(self.depths),
            "kernels": list(self.kernels),
            "heads": self.heads,
        }
        if self.block_sizes != self.release_blocks():
            sizes["blocks"] = [asdict(b) for b in self.block_sizes]
        return sizes

    @classmethod
    def from_sizes(
        cls, in_channels: int, n_classes: int, variant: str, sizes: Mapping[str, Any]
    ) -> MobileUtr:
        """Raises InputError for sizes that build no MobileUtr; None marks a size that a
        checkpoint's tensors did not give (see release.recognise)."""
        try:
            dims, depths, kernels = (list(sizes[k]) for k in ("dims", "depths", "kernels"))
            heads = sizes["heads"]
        except (KeyError, TypeError) as error:
            raise InputError(f"MobileUtr sizes are incomplete or malformed ({error})") from None
        if len(dims) != 4 or len(depths) != 5 or len(kernels) != 3:
            raise InputError(
                "MobileUtr needs 4 dims, 5 depths and 3 kernels, got "
                f"{len(dims)}, {len(depths)} and {len(kernels)}"
            )
        if None in dims:
            raise InputError("incomplete MobileUtr weights: no tensor gives every stage's width")
        empty = [stage for stage, d in zip(STAGES, depths, strict=True) if not d]
        if empty:
            raise InputError(
                f"MobileUtr weights with no blocks in {', '.join(empty)} (every stage needs "
                "at least one: a stage is missing)"
            )
        if heads is None:
            raise InputError(
                f"MobileUtr widths {', '.join(map(str, dims))} fit no variant ("
                + "; ".join(
                    f"{name}: {', '.join(map(str, v['dims']))}" for name, v in cls.variants.items()
                )
                + "); the head count is not in the tensors, so such weights need a model card "
                "that records their sizes"
            )
        try:
            dims, depths, kernels = ([int(v) for v in x] for x in (dims, depths, kernels))
            heads = int(heads)
        except (TypeError, ValueError) as error:
            raise InputError(f"MobileUtr sizes are malformed ({error})") from None
        if min(dims + depths + kernels) < 1 or heads < 1 or any(k % 2 == 0 for k in kernels):
            raise InputError(
                f"MobileUtr sizes out of range: dims {dims}, depths {depths}, kernels {kernels} "
                f"(odd), heads {heads}"
            )
        if dims[2] % heads or dims[3] % heads:
            raise InputError(
                f"MobileUtr widths {dims[2]} and {dims[3]} must be multiples of {heads} heads"
            )
        blocks = _block_sizes(sizes.get("blocks"), depths[3] + depths[4])
        return cls(in_channels, n_classes, dims, depths, kernels, heads, variant, blocks=blocks)

    @classmethod
    def recognise(cls, state) -> dict | None:
        from napari_apformer.model.mobileutr.release import recognise

        return recognise(state)

    @classmethod
    def to_our_names(cls, state) -> dict[str, torch.Tensor]:
        from napari_apformer.model.mobileutr.release import to_our_names

        return to_our_names(state)

    def predict(self, x: torch.Tensor, want_attention: bool = False, **settings) -> Prediction:
        """x: (B, in_channels, H, W), H and W multiples of 16. With want_attention,
        `attention` holds per image what `query_attention` needs: each bottleneck layer's
        normed (and, in the LGL stage, sampled) tokens, then the token grid's (rows, cols)."""
        self.resolve_settings(settings)  # none declared: refuses unknown names
        self.check_input(x)
        if self._one_at_a_time(x):
            parts = [self.predict(x[i : i + 1], want_attention) for i in range(x.shape[0])]
            attention = [a for p in parts for a in p.attention] if want_attention else None
            return Prediction(
                logits=torch.cat([p.logits for p in parts]),
                flops=torch.cat([p.flops for p in parts]),
                attention=attention,
            )
        trace: list[torch.Tensor] | None = [] if want_attention else None
        logits = self.run(x, trace)
        height, width = x.shape[-2:]
        flops = torch.full((x.shape[0],), self.reference_flops(height, width), dtype=torch.int64)
        attention = None
        if trace is not None:
            grid = torch.tensor([height // PATCH, width // PATCH])
            attention = [[*(t[j] for t in trace), grid] for j in range(x.shape[0])]
        return Prediction(logits=logits, flops=flops, attention=attention)

    def reference_flops(self, height: int, width: int) -> int:
        """One image's FLOPs, by formula (tests hold it equal to torch's count)."""
        from napari_apformer.model.mobileutr.flops import image_flops

        return image_flops(self, height, width)

    # -- query attention ---------------------------------------------------------------------
    def attention_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The transformer stage's token grid (32 x 32 for 256 x 256); the LGL stage's
        attention is drawn on it too (see query_attention)."""
        return height // PATCH, width // PATCH, PATCH

    def attention_shape(self) -> tuple[int, int]:
        """(LGL blocks + transformer blocks, heads)."""
        return len(self.lklgl_bottleneck) + len(self.transformer_bottleneck), self.heads

    def attention_pruned(self) -> bool:
        """MobileUtr prunes nothing."""
        return False

    def query_attention(
        self, state: Sequence[torch.Tensor], token: int, **settings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, heads, rows * cols) attention of the query at `token` (row-major on the
        attention grid), LGL blocks first. Nothing is pruned, so "after" and "before" pruning
        are equal.

        An LGL block attends among the tokens at (2i, 2j) only, and its output reaches the 2 x 2
        cell of each such token through LocalProp: the query token (r, c) takes the attention
        row of the sampled token (r // 2 * 2, c // 2 * 2), and each key's weight is spread
        evenly over the 2 x 2 cell it was sampled from (a quarter on each token, so a row
        still sums to 1).
        """
        self.resolve_settings(settings)
        *tokens, grid = state
        rows, cols = (int(v) for v in grid)
        if not 0 <= token < rows * cols:
            raise InputError(f"query token {token} is outside the {rows} x {cols} token grid")
        blocks = [*self.lklgl_bottleneck, *self.transformer_bottleneck]
        out = [
            self.layer_attention(block, layer_tokens, token, rows, cols)
            for block, layer_tokens in zip(blocks, tokens, strict=True)
        ]
        after = torch.stack(out)
        return after, after.clone()

    @staticmethod
    def layer_attention(
        block: LGLBlock, layer_tokens: torch.Tensor, token: int, rows: int, cols: int
    ) -> torch.Tensor:
        """(heads, rows * cols) attention of the query at `token` in one bottleneck block,
        from the tokens it traced (see query_attention)."""
        attn = block.SelfAttn.attn
        if attn.sample == 1:
            query = torch.tensor([token], device=layer_tokens.device)
            return attn.query_rows(layer_tokens, query)[:, 0]
        s = attn.sample
        r, c = divmod(token, cols)
        query = torch.tensor([(r // s) * (cols // s) + c // s], device=layer_tokens.device)
        row = attn.query_rows(layer_tokens, query)[:, 0].unflatten(1, (rows // s, -1))
        spread = row.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2) / (s * s)
        return spread.flatten(1)

    # -- the network ---------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"MobileUtr expects input of shape (B, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}"
            )
        self.input_rule.check(*x.shape[-2:])

    def _one_at_a_time(self, batch: torch.Tensor) -> bool:
        """On the CPU at inference, images go through one by one, as APFormer's do (batching
        gains no speed there; docs/performance.md)."""
        return batch.device.type == "cpu" and batch.shape[0] > 1 and not self.training

    def run(self, x: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        """Logits (B, n_classes, H, W); trace: where given, each bottleneck layer's attention
        tokens (B, n, C) are appended."""
        s0, s1, s2 = self.patch_embeddings(x.contiguous(memory_format=torch.channels_last))
        pooled = F.max_pool2d(s2, 2)  # the bottleneck's input and the first skip
        y = pooled
        for block in self.lklgl_bottleneck:
            y = block(y, trace)
        y = self.expend_dims(y)
        for block in self.transformer_bottleneck:
            y = block(y, trace)
        y = self.reduce_dims(y)
        y = self.Up_conv4(torch.cat([y, pooled], dim=1))
        y = self.Up_conv3(torch.cat([self.Up3(y), F.max_pool2d(s1, 2)], dim=1))
        y = self.Up_conv2(torch.cat([self.Up2(y), F.max_pool2d(s0, 2)], dim=1))
        return self.head(self.Up1(y))

    def training_losses(
        self, x: torch.Tensor, target: torch.Tensor, step: int, **options
    ) -> dict[str, torch.Tensor]:
        """U-Bench's multi-class recipe for this network (spec section 5): 0.3 cross-entropy +
        0.7 soft Dice over the foreground classes. Options of other families are ignored."""
        logits = self(x)
        cross_entropy = F.cross_entropy(logits, target)
        dice = soft_dice_loss(logits, target)
        total = CROSS_ENTROPY_WEIGHT * cross_entropy + DICE_WEIGHT * dice
        return {"total": total, "cross_entropy": cross_entropy, "dice": dice}

    def parameter_groups(self, learning_rate: float, **options) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": learning_rate}]

    # -- compression (JointSearch; the factors and the slicing are in search.py) ---------------
    def searchable_dimensions(self) -> dict[str, list[int]]:
        """Per bottleneck block (LGL blocks first): head channels and MLP hidden units."""
        return mobileutr_search.searchable_dimensions(self)

    def search_defaults(self) -> dict[str, dict]:
        """Per dimension: label, L1 weight ("lambda", 0: not searched) and per-layer floor."""
        return {name: dict(values) for name, values in mobileutr_search.SEARCH_DEFAULTS.items()}

    def add_search_factors(self, dimensions: Sequence[str]) -> dict[str, list[nn.Parameter]]:
        return mobileutr_search.add_search_factors(self, dimensions)

    def search_factors(self) -> dict[str, list[nn.Parameter]]:
        return mobileutr_search.search_factors(self)

    def remove_search_factors(self) -> None:
        mobileutr_search.remove_search_factors(self)

    def slimmed_sizes(self, counts: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        return mobileutr_search.slimmed_sizes(self, counts)

    def slimmed(self, keep: Mapping[str, Sequence[torch.Tensor]]) -> MobileUtr:
        return mobileutr_search.slimmed(self, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes, H, W) of x (B, in_channels, H, W), H and W multiples of 16."""
        self.check_input(x)
        return self.run(x)


def _block_sizes(blocks: Any, count: int) -> list[BlockSizes] | None:
    """The recorded inner widths of the `count` bottleneck blocks (None: the release's);
    InputError for a malformed record."""
    if blocks is None:
        return None
    try:
        parsed = [
            BlockSizes(int(b["dim_qk"]), int(b["dim_v"]), int(b["mlp"]), float(b["scale"]))
            for b in blocks
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"MobileUtr block sizes are malformed ({error})") from None
    if len(parsed) != count:
        raise InputError(
            f"MobileUtr sizes record {len(parsed)} bottleneck blocks, the depths give {count}"
        )
    for i, b in enumerate(parsed):
        if min(b.dim_qk, b.dim_v, b.mlp) < 1 or not (math.isfinite(b.scale) and b.scale > 0):
            raise InputError(f"MobileUtr bottleneck block {i}: sizes out of range ({b})")
    return parsed
