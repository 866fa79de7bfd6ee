"""The release's checkpoints (Mobile U-ViT `network/MobileUViT.py`, and U-Bench's copy):
recognising them and reading their sizes from the tensors.

Our parameter names are the release's. Its first upload and U-Bench name the LGL stage
`adaptive_lgl_bottleneck.`, later commits `lklgl_bottleneck.` (ours); the shapes are the same.
A `state_dict` wrapper (U-Bench) and `module.` prefixes are removed by `checkpoint`.

The head count is not stored in the tensors (the release derives it from `embed_dim`): widths
that match a variant take that variant's; other widths need a model card with the sizes.
Compressed bottleneck blocks (narrower attention or MLP, search.py) are read from the shapes
of `qkv`, `proj` and `fc1`; their softmax scale, which no tensor holds, is taken to be the
release's (compression keeps it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import torch

from napari_apformer.model.mobileutr.blocks import BlockSizes

OURS = "lklgl_bottleneck."
ALIASES = ("adaptive_lgl_bottleneck.",)
SIGNATURE = ("patch_embeddings.", OURS, "transformer_bottleneck.", "expend_dims.", "reduce_dims.")
STEM = "patch_embeddings.stem.0.weight"
PRUNING_HEAD = "pred_class.weight"  # mobileutr-ap's (see pruned_network.py)
# Where each width can be read: (key, axis), the first present wins (a missing stage is then
# reported by the strict load, which names its tensors).
WIDTHS = (
    ((STEM, 0), ("patch_embeddings.layer1.up.0.weight", 0), ("Up1.up.1.weight", 0)),
    (("patch_embeddings.layer2.up.0.weight", 0), ("Up3.up.1.weight", 0)),
    (("patch_embeddings.layer3.up.0.weight", 0), ("expend_dims.conv.0.weight", 1)),
    (("expend_dims.conv.0.weight", 0), ("reduce_dims.conv.0.weight", 1)),
)
BLOCKS = (
    "patch_embeddings.layer1.block.{}.0.fn.0.weight",
    "patch_embeddings.layer2.block.{}.0.fn.0.weight",
    "patch_embeddings.layer3.block.{}.0.fn.0.weight",
    OURS + "{}.SelfAttn.attn.qkv.weight",
    "transformer_bottleneck.{}.SelfAttn.attn.qkv.weight",
)


def to_our_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LGL stage under our prefix (unless the state has both, which the strict load then
    refuses)."""
    if any(key.startswith(OURS) for key in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        for alias in ALIASES:
            if key.startswith(alias):
                key = OURS + key[len(alias) :]
        out[key] = value
    return out


def recognise(state: Mapping[str, torch.Tensor]) -> dict | None:
    """{in_channels, n_classes, variant, sizes} of a MobileUtr state_dict in our names, None
    if the keys are not MobileUtr's (or are mobileutr-ap's, which has a pruning head). Sizes
    the tensors do not give are None (from_sizes then says what is missing); the in_channels
    of a 3-channel stem is 3, whatever the data."""
    if PRUNING_HEAD in state:
        return None
    return architecture_of(state)


def architecture_of(state: Mapping[str, torch.Tensor]) -> dict | None:
    """recognise's answer for MobileUtr's own tensors, whatever else the state holds."""
    from napari_apformer.model.mobileutr.network import MobileUtr

    if not any(key.startswith(SIGNATURE) for key in state):
        return None

    def read(places: tuple[tuple[str, int], ...]) -> int | None:
        for key, axis in places:
            if key in state and state[key].dim() > axis:
                return int(state[key].shape[axis])
        return None

    def count(pattern: str) -> int:
        n = 0
        while pattern.format(n) in state:
            n += 1
        return n

    dims = [read(places) for places in WIDTHS]
    depths = [count(pattern) for pattern in BLOCKS]
    kernels = [int(state[BLOCKS[i].format(0)].shape[-1]) if depths[i] else None for i in range(3)]
    variant, heads = "default", None
    for name, sizes in MobileUtr.variants.items():
        if dims == sizes["dims"]:
            variant, heads = name, sizes["heads"]
    sizes = {"dims": dims, "depths": depths, "kernels": kernels, "heads": heads}
    if heads is not None:
        blocks = block_sizes_of(state, dims[2:], depths[3:], heads)
        if blocks is not None:
            sizes["blocks"] = blocks
    return {
        "in_channels": int(state[STEM].shape[1]) if STEM in state else 1,
        "n_classes": int(state["head.weight"].shape[0]) if "head.weight" in state else 1,
        "variant": variant,
        "sizes": sizes,
    }


def block_sizes_of(
    state: Mapping[str, torch.Tensor], dims: list[int], depths: list[int], heads: int
) -> list[dict] | None:
    """The inner widths of the LGL and transformer blocks (stage widths `dims`, block counts
    `depths`) as the sizes' "blocks" record, None where every block is the release's (or a
    tensor is missing: the strict load names it). A block whose shapes no compression could
    have left (wider than the release's, or not whole heads) is taken to be the release's,
    so that the strict load names the tensor of the wrong shape."""
    blocks, release = [], []
    for pattern, dim, depth in zip(BLOCKS[3:], dims, depths, strict=True):
        for i in range(depth):
            prefix = pattern.format(i).removesuffix("attn.qkv.weight")
            keys = [prefix + k for k in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight")]
            if not all(key in state and state[key].dim() == 2 for key in keys):
                return None
            qkv, proj, fc1 = (state[key] for key in keys)  # rows [q; k; v], proj takes v
            v_width = proj.shape[1]
            dim_qk, dim_v = (qkv.shape[0] - v_width) // (2 * heads), v_width // heads
            default = BlockSizes.release(dim, heads)
            found = BlockSizes(dim_qk, dim_v, fc1.shape[0], default.scale)
            whole = qkv.shape[0] == heads * (2 * dim_qk + dim_v) and v_width == heads * dim_v
            narrower = all(
                1 <= getattr(found, name) <= getattr(default, name)
                for name in ("dim_qk", "dim_v", "mlp")
            )
            release.append(default)
            blocks.append(found if whole and narrower else default)
    return None if blocks == release else [asdict(b) for b in blocks]


def fold_grey_stem(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 3-channel checkpoint as a 1-channel one: the stem's weights summed over their input
    channels. Exact only when the three channels the model sees are equal, as when a grey image
    is repeated (the release's forward does that); a model fed colour, or channels normalised
    with different means and deviations (the release's ImageNet Normalize), sees three
    different channels, and the folded model then differs from it."""
    out = dict(state)
    out[STEM] = state[STEM].sum(dim=1, keepdim=True)
    return out
