"""mobileutr-ap: MobileUtr with APFormer's adaptive pruning as a plug-in (Lin et al., IEEE TMI
2023, claim the pruning works on other hybrid networks; this tries it on MobileUtr).

What is grafted where: APFormer's pruning head (`pred_class`, a 1 x 1 convolution to
background / foreground logits per token) reads the transformer stage's input (after
`expend_dims`, d3 channels on the 1/8 grid); the stage's blocks get query-wise pruning (a
token whose background probability is at least `token_threshold` skips every block's
attention) and dependency-wise pruning (per block, APFormer's ratio layer and `gate`); see
`pruned_stage.py`. Everything else, and every MobileUtr parameter name, is MobileUtr's, so a
MobileUtr state_dict fills all but the added tensors, and with the pruning off (threshold 1,
gates low) the logits are MobileUtr's.

The forward pass is split for the engine's cache: `encode` (patch embedding, LGL stage,
`expend_dims`, pruning head, the pooled skips) does not depend on the settings; `decode` runs
the pruned stage and the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_apformer.errors import InputError
from napari_apformer.model.apformer.attention import LayerTrace
from napari_apformer.model.apformer.losses import (
    HEAD_WEIGHT,
    SEGMENTATION_WEIGHT,
    SSA_WEIGHT,
    segmentation_loss,
    ssa_loss,
    token_target,
)
from napari_apformer.model.apformer.network import BACKGROUND, GATE_RANGE, check_token_threshold
from napari_apformer.model.base import (
    CounterSpec,
    MapSpec,
    Prediction,
    Setting,
    SettingValue,
)
from napari_apformer.model.losses import soft_dice_loss
from napari_apformer.model.mobileutr.network import (
    CROSS_ENTROPY_WEIGHT,
    DICE_WEIGHT,
    PATCH,
    MobileUtr,
)
from napari_apformer.model.mobileutr.pruned_stage import PrunedGlobalAttn, graft, run_stage

DEFAULT_TOKEN_THRESHOLD = 0.9  # APFormer's released value


@dataclass
class EncodedAP:
    """Everything of a pass that does not depend on the settings (the engine caches it)."""

    features: torch.Tensor  # (B, d3, rows, cols): the transformer stage's input
    token_logits: torch.Tensor  # (B, 2, rows, cols): the pruning head
    skips: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # max-pooled s2, s1, s0
    lgl_tokens: tuple[torch.Tensor, ...] = ()  # each LGL block's sampled tokens (attention)

    def tensors(self) -> list[torch.Tensor]:
        return [self.features, self.token_logits, *self.skips, *self.lgl_tokens]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select(self, index: slice | Sequence[int]) -> EncodedAP:
        """Slices at `index`: views for a slice, a copy for a list."""
        return EncodedAP(
            self.features[index],
            self.token_logits[index],
            tuple(t[index] for t in self.skips),  # type: ignore[arg-type]
            tuple(t[index] for t in self.lgl_tokens),
        )

    @staticmethod
    def cat(items: Sequence[EncodedAP]) -> EncodedAP:
        if len(items) == 1:
            return items[0]

        def joined(k: int) -> torch.Tensor:
            return torch.cat([i.tensors()[k] for i in items])

        parts = [joined(k) for k in range(len(items[0].tensors()))]
        return EncodedAP(parts[0], parts[1], tuple(parts[2:5]), tuple(parts[5:]))  # type: ignore[arg-type]


@dataclass
class PrunedOutput:
    logits: torch.Tensor  # (B, K, H, W)
    token_logits: torch.Tensor  # (B, 2, rows, cols)
    keep: torch.Tensor  # (B, N) bool
    traces: list[LayerTrace] = field(default_factory=list)


class MobileUtrAP(MobileUtr):
    """MobileUtr with APFormer's pruning head and query- and dependency-wise pruning in its
    transformer stage. Sizes and variants ("default", "L") are MobileUtr's."""

    family = "mobileutr-ap"
    variants: ClassVar = MobileUtr.variants
    # Not compressible: its transformer blocks carry the pruning attention, which the joint
    # search does not slice. None switches MobileUtr's JointSearch off (as `__hash__ = None`
    # does hashing), so `compress.capability.joint_search` refuses the family in one line.
    searchable_dimensions = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pred_class = nn.Conv2d(self.dims[3], 2, kernel_size=1)
        for block in self.transformer_bottleneck:
            graft(block)

    @classmethod
    def recognise(cls, state) -> dict | None:
        """MobileUtr's sizes, for a state that also holds the pruning head."""
        from napari_apformer.model.mobileutr.release import PRUNING_HEAD, architecture_of

        return architecture_of(state) if PRUNING_HEAD in state else None

    # -- settings, maps, counters (APFormer's) ---------------------------------------------------
    @property
    def attention_layers(self) -> list[PrunedGlobalAttn]:
        return [block.SelfAttn.attn for block in self.transformer_bottleneck]

    @property
    def depth(self) -> int:
        return len(self.transformer_bottleneck)

    def stored_gates(self) -> list[float]:
        return [float(attn.gate.detach()) for attn in self.attention_layers]

    def declared_settings(self) -> list[Setting]:
        """APFormer's two settings (names, labels, ranges; tests hold them equal), for the
        transformer stage's blocks."""
        return [
            Setting(
                "token_threshold",
                "token threshold",
                0.0,
                1.0,
                DEFAULT_TOKEN_THRESHOLD,
                "A token is pruned (skipped by every transformer-stage block's attention) when "
                "the pruning head's background probability for it is at least this; 1 keeps "
                "all tokens.",
                step=0.01,
                low_open=True,
            ),
            Setting(
                "gate",
                "dependency gate",
                *GATE_RANGE,
                self.stored_gates(),
                "Per transformer-stage block: higher gates drop more of each query's weak "
                "attention links (dependency pruning); one value for all blocks or one per "
                "block.",
                per_layer=self.depth,
                step=0.1,
            ),
        ]

    def unpruned_settings(self) -> dict[str, SettingValue]:
        return {"token_threshold": 1.0}

    def set_defaults(self, values) -> None:
        """The gates are parameters (saved with the weights): they take the values too."""
        super().set_defaults(values)
        for attn, gate in zip(self.attention_layers, values["gate"], strict=True):
            attn.gate.data.fill_(gate)

    def defaults(self) -> dict[str, SettingValue]:
        return {**super().defaults(), "gate": self.stored_gates()}

    def map_specs(self) -> list[MapSpec]:
        return [
            MapSpec("keep", "kept tokens", PATCH, "mask", "tokens the transformer stage attends"),
            MapSpec(
                "background_probability",
                "background probability",
                PATCH,
                "probability",
                "the pruning head's probability that a token is background",
            ),
            MapSpec(
                "kept_dependencies",
                "kept dependencies",
                PATCH,
                "fraction",
                "fraction of keys each query kept, mean over blocks and heads (0 if pruned)",
            ),
        ]

    def counter_specs(self) -> list[CounterSpec]:
        return [
            CounterSpec("kept_tokens", "kept tokens"),
            CounterSpec("kept_dependencies", "kept dependencies"),
        ]

    # -- the pass --------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, want_attention: bool = False, **settings) -> Prediction:
        values = self.resolve_settings(settings)
        prediction = self.decode(self.encode(x), want_attention, **values)
        prediction.flops = prediction.flops + self.encode_flops(*x.shape[-2:])
        return prediction

    def encode(self, x: torch.Tensor) -> EncodedAP:
        self.check_input(x)
        if self._one_at_a_time(x):
            return EncodedAP.cat([self.encode(x[i : i + 1]) for i in range(x.shape[0])])
        s0, s1, s2 = self.patch_embeddings(x.contiguous(memory_format=torch.channels_last))
        pooled = F.max_pool2d(s2, 2)
        trace: list[torch.Tensor] = []
        y = pooled
        for block in self.lklgl_bottleneck:
            y = block(y, trace)
        features = self.expend_dims(y)
        skips = (pooled, F.max_pool2d(s1, 2), F.max_pool2d(s0, 2))
        return EncodedAP(features, self.pred_class(features), skips, tuple(trace))

    def decode(self, encoded: EncodedAP, want_attention: bool = False, **settings) -> Prediction:
        values = self.resolve_settings(settings)
        if self._one_at_a_time(encoded.features):
            parts = [
                self.decode(encoded.select(slice(i, i + 1)), want_attention, **values)
                for i in range(encoded.features.shape[0])
            ]
            return _joined(parts)
        out = self.run_decoder(
            encoded, values["token_threshold"], values["gate"], keep_inputs=want_attention
        )
        return self.prediction(encoded, out, want_attention)

    def run_decoder(
        self,
        encoded: EncodedAP,
        token_threshold: float,
        gate: float | Sequence[float] | None,
        keep_inputs: bool = False,
        content_attention: bool = False,
    ) -> PrunedOutput:
        """The pruned transformer stage and the decoder. gate None: the stored gates."""
        keep = self.keep_mask(encoded.token_logits, token_threshold)
        y, traces = run_stage(
            self.transformer_bottleneck,
            encoded.features,
            keep,
            self.gate_values(gate, encoded.features),
            keep_inputs,
            content_attention,
        )
        pooled, pooled1, pooled0 = encoded.skips
        y = self.Up_conv4(torch.cat([self.reduce_dims(y), pooled], dim=1))
        y = self.Up_conv3(torch.cat([self.Up3(y), pooled1], dim=1))
        y = self.Up_conv2(torch.cat([self.Up2(y), pooled0], dim=1))
        return PrunedOutput(self.head(self.Up1(y)), encoded.token_logits, keep, traces)

    def keep_mask(self, token_logits: torch.Tensor, token_threshold: float) -> torch.Tensor:
        """(B, N) kept queries: background probability below the threshold (1 keeps all,
        also where the probability rounds to 1), as APFormer's."""
        check_token_threshold(token_threshold)
        if token_threshold >= 1.0:
            shape = (token_logits.shape[0], token_logits[0, 0].numel())
            return torch.ones(shape, dtype=torch.bool, device=token_logits.device)
        background = torch.softmax(token_logits, dim=1)[:, BACKGROUND]
        return (background < token_threshold).flatten(1)

    def gate_values(self, gate: float | Sequence[float] | None, like: torch.Tensor) -> torch.Tensor:
        if gate is None:
            return torch.stack([a.gate for a in self.attention_layers]).to(like.dtype)
        values = [float(gate)] * self.depth if isinstance(gate, int | float) else list(gate)
        if len(values) != self.depth:
            raise InputError(f"gate: expected 1 or {self.depth} values, got {len(values)}")
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def prediction(
        self, encoded: EncodedAP, out: PrunedOutput, want_attention: bool = False
    ) -> Prediction:
        """The family interface's view of a decode."""
        from napari_apformer.model.mobileutr.pruned_flops import decoder_flops, image_flops

        batch, _, rows, cols = encoded.token_logits.shape
        height, width = rows * PATCH, cols * PATCH
        tokens = rows * cols
        kept = out.keep.sum(dim=1)
        fractions = torch.stack([t.kept_dependency_fraction.mean(dim=1) for t in out.traces])
        kept_dependencies = torch.stack([t.kept_dependencies for t in out.traces]).sum(dim=0)
        possible = self.depth * self.heads * kept * tokens
        counts = kept.tolist()
        grid = (batch, rows, cols)
        attention = None
        if want_attention:
            size = torch.tensor([rows, cols])
            attention = [
                [
                    *(t[j] for t in encoded.lgl_tokens),
                    *(t.layer_input[j] for t in out.traces),
                    size,
                    out.keep[j],
                ]
                for j in range(batch)
            ]
        return Prediction(
            logits=out.logits,
            maps={
                "keep": out.keep.view(grid),
                "background_probability": torch.softmax(out.token_logits.float(), dim=1)[
                    :, BACKGROUND
                ],
                "kept_dependencies": fractions.float().mean(dim=0).view(grid),
            },
            counters={
                "kept_tokens": torch.stack([kept, torch.full_like(kept, tokens)], dim=1),
                "kept_dependencies": torch.stack([kept_dependencies, possible], dim=1),
            },
            flops=torch.tensor(
                [decoder_flops(self, height, width, k) for k in counts], dtype=torch.int64
            ),
            full_flops=torch.tensor(
                [image_flops(self, height, width, k) for k in counts], dtype=torch.int64
            ),
            attention=attention,
        )

    def reference_flops(self, height: int, width: int) -> int:
        """Nothing pruned, by formula (tests hold it equal to torch's count)."""
        from napari_apformer.model.mobileutr.pruned_flops import image_flops

        return image_flops(self, height, width, (height // PATCH) * (width // PATCH))

    def encode_flops(self, height: int, width: int) -> int:
        from napari_apformer.model.mobileutr.pruned_flops import encoder_flops

        return encoder_flops(self, height, width)

    def prepare_cache(self, encoded: EncodedAP, **settings) -> int:
        return 0  # nothing settings-dependent is cached

    def attention_pruned(self) -> bool:
        return True

    def query_attention(
        self, state: Sequence[torch.Tensor], token: int, **settings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, heads, rows * cols) after and before dependency pruning, LGL blocks
        first (not pruned: after equals before there, as in MobileUtr); zeros in the
        transformer stage's blocks for a pruned query."""
        gates = self.resolve_settings(settings)["gate"]
        *tokens, grid, keep = state
        rows, cols = (int(v) for v in grid)
        if not 0 <= token < rows * cols:
            raise InputError(f"query token {token} is outside the {rows} x {cols} token grid")
        lgl = len(self.lklgl_bottleneck)
        after, before = [], []
        for block, layer_tokens in zip(self.lklgl_bottleneck, tokens[:lgl], strict=True):
            row = self.layer_attention(block, layer_tokens, token, rows, cols)
            after.append(row)
            before.append(row)
        for attn, x, gate in zip(self.attention_layers, tokens[lgl:], gates, strict=True):
            if not keep[token]:
                after.append(x.new_zeros(self.heads, rows * cols))
                before.append(x.new_zeros(self.heads, rows * cols))
                continue
            g = torch.tensor(float(gate), dtype=x.dtype, device=x.device)
            record = attn.attention_rows(x[None], torch.tensor([token]), g)
            after.append(record.attention[0, :, 0])
            before.append(record.attention_before[0, :, 0])
        return torch.stack(after), torch.stack(before)

    # -- training ----------------------------------------------------------------------------------
    def training_losses(
        self, x: torch.Tensor, target: torch.Tensor, step: int, **options
    ) -> dict[str, torch.Tensor]:
        """APFormer's weighting, 0.8 segmentation + 0.1 pruning head + 0.1 SSA, with
        MobileUtr's own segmentation loss (0.3 cross-entropy + 0.7 soft Dice, as the mobileutr
        weights were trained) and APFormer's head loss (Dice + cross-entropy of the pruning
        head against "any foreground pixel in the token's 8 x 8 block") and SSA on the
        transformer stage's content attention. Training runs pruned at the threshold, as
        APFormer's does. Options: token_threshold, ssa_every (SSA every n-th step)."""
        with_ssa = step % int(options.get("ssa_every", 1)) == 0
        tau = float(options.get("token_threshold", self.settings()[0].default))
        encoded = self.encode(x)
        out = self.run_decoder(encoded, tau, None, content_attention=with_ssa)
        cross_entropy = F.cross_entropy(out.logits, target)
        dice = soft_dice_loss(out.logits, target)
        segmentation = CROSS_ENTROPY_WEIGHT * cross_entropy + DICE_WEIGHT * dice
        head = segmentation_loss(out.token_logits, token_target(target))
        total = SEGMENTATION_WEIGHT * segmentation + HEAD_WEIGHT * head
        ssa = torch.zeros((), device=total.device)
        if with_ssa:
            ssa = ssa_loss([t.content_attention for t in out.traces])  # type: ignore[misc]
            total = total + SSA_WEIGHT * ssa
        return {
            "total": total,
            "segmentation": segmentation,
            "cross_entropy": cross_entropy,
            "dice": dice,
            "head": head,
            "ssa": ssa,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the default settings."""
        return self.decode(self.encode(x)).logits


def _joined(parts: Sequence[Prediction]) -> Prediction:
    """One Prediction of the images of several."""
    first = parts[0]
    attention = [a for p in parts for a in p.attention] if first.attention is not None else None
    return Prediction(
        logits=torch.cat([p.logits for p in parts]),
        maps={k: torch.cat([p.maps[k] for p in parts]) for k in first.maps},
        counters={k: torch.cat([p.counters[k] for p in parts]) for k in first.counters},
        flops=torch.cat([p.flops for p in parts]),  # type: ignore[misc]
        full_flops=torch.cat([p.full_flops for p in parts]),  # type: ignore[misc]
        attention=attention,
    )
