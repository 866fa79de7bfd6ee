"""APFormer (Lin et al., IEEE TMI 2023): a quarter-width CNN U-Net with one pruning
transformer stage at 1/8 resolution.

The forward pass is split in two so that a threshold or gate change reruns only what it
affects: `encode` (CNN encoder, pruning head and the skip halves of the decoder's first
convolutions, none of which depend on the pruning settings) and `run_decoder` (the
transformer and the rest of the decoder). `predict`/`decode` wrap them in the family
interface of `model.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_apformer.errors import InputError
from napari_apformer.model.apformer import search as apformer_search
from napari_apformer.model.apformer.attention import (
    AttentionRecord,
    FirstLayer,
    LayerSizes,
    LayerTrace,
    PruningTransformer,
)
from napari_apformer.model.base import (
    CounterSpec,
    InputRule,
    MapSpec,
    Prediction,
    SegmentationModel,
    Setting,
    SettingValue,
)

INPUT_SIZE = 256  # the release's input size
PATCH = 8  # three 2x downsamplings: one token per 8 x 8 input pixels
TOKEN_GRID = INPUT_SIZE // PATCH
TOKENS = TOKEN_GRID * TOKEN_GRID
BACKGROUND = 0  # channel of the pruning head that holds the background logit
GATE_RANGE = (-10.0, 10.0)  # sigmoid(+-10) is within 5e-5 of 0 and 1


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int, mid: int | None = None) -> None:
        super().__init__()
        mid = mid or cout
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)

    def first_conv_part(self, x: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """The first convolution restricted to input channels [first, first + count)."""
        weight = self.double_conv[0].weight[:, first : first + count]
        return F.conv2d(x, weight, padding=1)

    def finish(self, first_conv_output: torch.Tensor) -> torch.Tensor:
        """Everything after the first convolution."""
        return self.double_conv[1:](first_conv_output)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Bilinear x2, concatenate [skip, upsampled], DoubleConv.

    The first convolution is linear in its input, so conv([skip, up]) = conv_skip(skip) +
    conv_up(up); the skip part is computed once in `encode` and cached.
    """

    def __init__(self, cin: int, cout: int, skip_channels: int) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.conv = DoubleConv(cin, cout, cin // 2)

    def skip_part(self, skip: torch.Tensor) -> torch.Tensor:
        return self.conv.first_conv_part(skip, 0, self.skip_channels)

    def forward(self, low: torch.Tensor, skip_part: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=True)
        dy, dx = skip_part.shape[-2] - up.shape[-2], skip_part.shape[-1] - up.shape[-1]
        if dy or dx:
            up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        up_part = self.conv.first_conv_part(up, self.skip_channels, up.shape[1])
        return self.conv.finish(skip_part + up_part)


class OutConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PixelHead(nn.Module):
    """Our pixel classification module (issue 15; the seed paper names one but its design
    could not be read, docs/compression.md): on the last decoder feature map, Conv1x1
    cin->hidden, BatchNorm, ReLU, Conv1x1 hidden->classes, whose logits are added to those
    of `outc`. The last convolution starts at zero (weight and bias), so a head added to
    trained weights leaves their output unchanged until training moves it."""

    def __init__(self, cin: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(True),
            nn.Conv2d(hidden, n_classes, kernel_size=1),
        )
        nn.init.zeros_(self.net[3].weight)
        nn.init.zeros_(self.net[3].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class EncodedSlices:
    """Everything of a forward pass that does not depend on token_threshold, and optionally
    layer 1's output for every token at one gate (see APFormer.add_first_layer)."""

    x4: torch.Tensor  # (B, C, 32, 32)
    token_logits: torch.Tensor  # (B, 2, 32, 32)
    skip_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # for up2, up3, up4
    first_layer: FirstLayer | None = None

    def tensors(self) -> list[torch.Tensor]:
        extra = self.first_layer.tensors() if self.first_layer is not None else []
        return [self.x4, self.token_logits, *self.skip_parts, *extra]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select(self, index: slice | Sequence[int]) -> EncodedSlices:
        """Slices at `index`: views for a slice, a copy for a list (not keeping the batch)."""
        parts = tuple(t[index] for t in self.skip_parts)
        first = self.first_layer
        if first is not None:
            first = FirstLayer(first.gate, first.update[index], first.kept_per_query[index])
        return EncodedSlices(self.x4[index], self.token_logits[index], parts, first)  # type: ignore[arg-type]

    @staticmethod
    def cat(items: Sequence[EncodedSlices]) -> EncodedSlices:
        if len(items) == 1:
            return items[0]
        parts = tuple(torch.cat([i.skip_parts[k] for i in items]) for k in range(3))
        firsts = [i.first_layer for i in items]
        first = None
        if all(f is not None for f in firsts) and len({f.gate for f in firsts}) == 1:
            first = FirstLayer(
                firsts[0].gate,
                torch.cat([f.update for f in firsts]),
                torch.cat([f.kept_per_query for f in firsts]),
            )
        return EncodedSlices(
            torch.cat([i.x4 for i in items]),
            torch.cat([i.token_logits for i in items]),
            parts,  # type: ignore[arg-type]
            first,
        )


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, K, H, W)
    token_logits: torch.Tensor  # (B, 2, 32, 32)
    keep: torch.Tensor  # (B, 1024) bool
    layers: list[LayerTrace] = field(default_factory=list)
    first_layer_reused: bool = False  # layer 1 came from EncodedSlices.first_layer

    @property
    def kept_dependencies(self) -> torch.Tensor:
        """(B,) kept (query, key) pairs summed over layers and heads."""
        return torch.stack([t.kept_dependencies for t in self.layers]).sum(dim=0)

    @staticmethod
    def cat(parts: Sequence[ModelOutput]) -> ModelOutput:
        layers = [LayerTrace.cat([p.layers[k] for p in parts]) for k in range(len(parts[0].layers))]
        return ModelOutput(
            torch.cat([p.logits for p in parts]),
            torch.cat([p.token_logits for p in parts]),
            torch.cat([p.keep for p in parts]),
            layers,
            all(p.first_layer_reused for p in parts),
        )


class APFormer(SegmentationModel):
    """APFormer for `in_channels` input channels and `n_classes` classes.

    widths: the CNN's four stage widths (the release: 16, 32, 64, 128; the last is the token
    width); layers: each transformer layer's sizes (the release: 4 x 6 heads of 128, MLP 512);
    pixel_head: hidden channels of our optional pixel classification module (`PixelHead`;
    0, the release: none, and no trace of it in the sizes or the state_dict).
    """

    family = "apformer"
    variants: ClassVar = {
        "default": {
            "input_size": INPUT_SIZE,
            "widths": [16, 32, 64, 128],
            "layers": [{"heads": 6, "dim_head": 128, "mlp": 512, "scale": 128**-0.5}] * 4,
        }
    }

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 9,
        widths: Sequence[int] = (16, 32, 64, 128),
        layers: Sequence[LayerSizes] | None = None,
        input_size: int = INPUT_SIZE,
        variant: str = "default",
        pixel_head: int = 0,
    ) -> None:
        super().__init__(in_channels, n_classes, variant)
        if layers is None:
            layers = [LayerSizes(**d) for d in self.variants["default"]["layers"]]
        if input_size % PATCH:
            raise InputError(f"APFormer input size must be a multiple of {PATCH}, got {input_size}")
        self.widths, self.layer_sizes, self.input_size = list(widths), list(layers), input_size
        w1, w2, w3, w4 = self.widths
        self.inc = DoubleConv(in_channels, w1)
        self.down1 = Down(w1, w2)
        self.down2 = Down(w2, w3)
        self.down3 = Down(w3, w4)
        self.trans4 = PruningTransformer(channels=w4, grid=input_size // PATCH, layers=layers)
        self.conv4 = nn.Conv2d(w4, w3, kernel_size=1, bias=False)
        self.up2 = Up(2 * w3, w2, skip_channels=w3)
        self.up3 = Up(2 * w2, w1, skip_channels=w2)
        self.up4 = Up(2 * w1, w1, skip_channels=w1)
        self.outc = OutConv(w1, n_classes)
        self.pixel_head: PixelHead | None = None
        if pixel_head:
            self.pixel_head = PixelHead(w1, pixel_head, n_classes)
        # Channels-last convolutions run about 10 % faster here (docs/performance.md); loading
        # a state_dict and moving devices keep this layout.
        self.to(memory_format=torch.channels_last)

    # -- the family interface ----------------------------------------------------------------
    @property
    def input_rule(self) -> InputRule:
        return InputRule(size=self.input_size)

    def sizes(self) -> dict:
        sizes = {
            "input_size": self.input_size,
            "widths": list(self.widths),
            "layers": [asdict(s) for s in self.layer_sizes],
        }
        if self.pixel_head is not None:
            sizes["pixel_head"] = self.pixel_head.net[0].out_channels
        return sizes

    @classmethod
    def from_sizes(cls, in_channels: int, n_classes: int, variant: str, sizes) -> APFormer:
        try:
            layers = [LayerSizes(**layer) for layer in sizes["layers"]]
            widths = [int(w) for w in sizes["widths"]]
            input_size = int(sizes["input_size"])
            pixel_head = sizes.get("pixel_head")  # absent: none (the release)
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"APFormer sizes are incomplete or malformed ({error})") from None
        if len(widths) != 4 or not layers:
            raise InputError("APFormer needs 4 CNN widths and at least one transformer layer")
        if pixel_head is not None and (
            isinstance(pixel_head, bool) or not isinstance(pixel_head, int) or pixel_head < 1
        ):
            raise InputError(
                f"APFormer sizes: pixel_head must be a positive number of channels, got "
                f"{pixel_head!r}"
            )
        return cls(in_channels, n_classes, widths, layers, input_size, variant, pixel_head or 0)

    @classmethod
    def recognise(cls, state) -> dict | None:
        from napari_apformer.model.apformer.release import recognise

        return recognise(state)

    def declared_settings(self) -> list[Setting]:
        return [
            Setting(
                "token_threshold",
                "token threshold",
                0.0,
                1.0,
                0.9,
                "A token is pruned (skipped by every transformer layer) when the pruning "
                "head's background probability for it is at least this; 1 keeps all tokens.",
                step=0.01,
                low_open=True,
            ),
            Setting(
                "gate",
                "dependency gate",
                *GATE_RANGE,
                self.trans4.stored_gates(),
                "Per layer: higher gates drop more of each query's weak attention links "
                "(dependency pruning); one value for all layers or one per layer.",
                per_layer=self.depth,
                step=0.1,
            ),
        ]

    def unpruned_settings(self) -> dict[str, SettingValue]:
        return {"token_threshold": 1.0}

    def map_specs(self) -> list[MapSpec]:
        return [
            MapSpec("keep", "kept tokens", PATCH, "mask", "tokens the transformer processes"),
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
                "fraction of keys each query kept, mean over layers and heads (0 if pruned)",
            ),
        ]

    def counter_specs(self) -> list[CounterSpec]:
        return [
            CounterSpec("kept_tokens", "kept tokens"),
            CounterSpec("kept_dependencies", "kept dependencies"),
        ]

    def predict(self, x: torch.Tensor, want_attention: bool = False, **settings) -> Prediction:
        values = self.resolve_settings(settings)
        out = self(x, values["token_threshold"], values["gate"], keep_inputs=want_attention)
        prediction = self.prediction(out, want_attention)
        prediction.flops = prediction.flops + self.encode_flops(*x.shape[-2:])
        return prediction

    def decode(
        self, encoded: EncodedSlices, want_attention: bool = False, **settings
    ) -> Prediction:
        values = self.resolve_settings(settings)
        out = self.run_decoder(
            encoded, values["token_threshold"], values["gate"], keep_inputs=want_attention
        )
        return self.prediction(out, want_attention)

    def prediction(self, out: ModelOutput, want_attention: bool = False) -> Prediction:
        """The family interface's view of a forward pass."""
        from napari_apformer.model.apformer.flops import decoder_flops, slice_flops

        batch = out.logits.shape[0]
        kept = out.keep.sum(dim=1)
        per_layer = torch.stack([t.kept_dependency_fraction.mean(dim=1) for t in out.layers])
        possible = sum(layer.heads for layer in self.layer_sizes) * kept * self.tokens
        flops = torch.tensor(
            [decoder_flops(self, int(k), out.first_layer_reused) for k in kept.tolist()],
            dtype=torch.int64,
        )
        full = torch.tensor([slice_flops(self, int(k)) for k in kept.tolist()], dtype=torch.int64)
        grid = (batch, self.trans4.grid, self.trans4.grid)
        return Prediction(
            logits=out.logits,
            maps={
                "keep": out.keep.view(grid),
                "background_probability": torch.softmax(out.token_logits.float(), dim=1)[
                    :, BACKGROUND
                ],
                "kept_dependencies": per_layer.float().mean(dim=0).view(grid),
            },
            counters={
                "kept_tokens": torch.stack([kept, torch.full_like(kept, self.tokens)], dim=1),
                "kept_dependencies": torch.stack([out.kept_dependencies, possible], dim=1),
            },
            flops=flops,
            full_flops=full,
            attention=(  # per image: each layer's normed input, then the keep mask
                [[*(t.layer_input[j] for t in out.layers), out.keep[j]] for j in range(batch)]
                if want_attention
                else None
            ),
        )

    def reference_flops(self, height: int, width: int) -> int:
        """By formula (tests hold it equal to torch's count of a real pass)."""
        from napari_apformer.model.apformer.flops import slice_flops

        return slice_flops(self, self.tokens)

    def encode_flops(self, height: int, width: int) -> int:
        from napari_apformer.model.apformer.flops import encoder_flops

        return encoder_flops(self)

    def prepare_cache(self, encoded: EncodedSlices, **settings) -> int:
        """Layer 1 for every token at the current gate, so a threshold change skips it."""
        from napari_apformer.model.apformer.flops import first_layer_flops

        gate = self.resolve_settings(settings)["gate"][0]
        if encoded.first_layer is not None and encoded.first_layer.gate == gate:
            return 0
        self.add_first_layer(encoded, gate)
        return first_layer_flops(self) * encoded.x4.shape[0]

    def attention_grid(self, height: int, width: int) -> tuple[int, int, int]:
        return self.trans4.grid, self.trans4.grid, PATCH

    def attention_shape(self) -> tuple[int, int]:
        heads = {s.heads for s in self.layer_sizes}
        return self.depth, max(heads)

    def attention_pruned(self) -> bool:
        return True

    def query_attention(
        self, state: list[torch.Tensor], token: int, **settings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, heads, tokens) after and before pruning, zeros for a pruned query; layers
        with fewer heads than the widest are padded with zeros."""
        gates = self.resolve_settings(settings)["gate"]
        *layer_inputs, keep = state
        layers, heads = self.attention_shape()
        if not keep[token]:
            empty = layer_inputs[0].new_zeros(layers, heads, self.tokens)
            return empty, empty.clone()
        records = self.attention_rows([x[None] for x in layer_inputs], [token], gates)

        def stacked(rows: list[torch.Tensor]) -> torch.Tensor:
            padded = [F.pad(r, (0, 0, 0, heads - r.shape[0])) for r in rows]
            return torch.stack(padded)

        return (
            stacked([r.attention[0, :, 0] for r in records]),
            stacked([r.attention_before[0, :, 0] for r in records]),
        )

    def training_losses(
        self, x: torch.Tensor, target: torch.Tensor, step: int, **options
    ) -> dict[str, torch.Tensor]:
        """The spec's losses; options: ssa_every (SSA term every n-th step), gate_sparsity
        (with learnable gates), token_threshold."""
        from napari_apformer.model.apformer.losses import training_loss

        with_ssa = step % int(options.get("ssa_every", 1)) == 0
        tau = options.get("token_threshold", self.setting_values.get("token_threshold", 0.9))
        out = self(x, tau, None, False, with_ssa)
        losses = training_loss(out, target, with_ssa=with_ssa)
        if self.trans4.attention_layers[0].gate.requires_grad:
            penalty = float(options.get("gate_sparsity", 0.0)) * self.soft_kept_dependencies(out)
            losses["total"] = losses["total"] + penalty
        return losses

    def parameter_groups(self, learning_rate: float, **options) -> list[dict]:
        """Learnable gates (one scalar per layer) get their own rate: Adam moves a parameter
        by about lr per step, so they need more than the weights."""
        gates = [layer.gate for layer in self.trans4.attention_layers if layer.gate.requires_grad]
        others = [
            p for p in self.parameters() if p.requires_grad and all(p is not g for g in gates)
        ]
        groups: list[dict] = [{"params": others, "lr": learning_rate}]
        if gates:
            rate = float(options.get("gate_learning_rate", 0.02))
            groups.append({"params": gates, "lr": rate, "weight_decay": 0})
        return groups

    # -- compression (Searchable; the factors and the slicing are in search.py) -------------
    def add_pixel_head(self, hidden: int | None = None) -> PixelHead:
        """Attach our pixel classification module (hidden channels: the last decoder map's
        width by default), its last convolution at zero: the output does not change until
        training moves it. Same device, layout and mode as the model."""
        if self.pixel_head is not None:
            raise ValueError("this model already has a pixel classification module")
        width = self.widths[0]
        device = self.outc.conv.weight.device
        head = PixelHead(width, hidden or width, self.n_classes)
        head.to(device=device, memory_format=torch.channels_last).train(self.training)
        self.pixel_head = head
        return head

    def searchable_dimensions(self) -> dict[str, list[int]]:
        """Dimension -> per-layer number of units compression may remove: head_channels
        (channels of a head, shared by Q, K, V and all heads), heads, mlp_hidden."""
        return apformer_search.searchable_dimensions(self)

    def search_defaults(self) -> dict[str, dict]:
        """Per dimension: label, L1 weight ("lambda", 0: not searched) and per-layer floor."""
        return {name: dict(values) for name, values in apformer_search.SEARCH_DEFAULTS.items()}

    def add_search_factors(self, dimensions: Sequence[str]) -> dict[str, list[nn.Parameter]]:
        return apformer_search.add_search_factors(self, dimensions)

    def search_factors(self) -> dict[str, list[nn.Parameter]]:
        return apformer_search.search_factors(self)

    def remove_search_factors(self) -> None:
        apformer_search.remove_search_factors(self)

    def slimmed_sizes(self, counts) -> dict:
        return apformer_search.slimmed_sizes(self, counts)

    def slimmed(self, keep) -> APFormer:
        return apformer_search.slimmed(self, keep)

    def set_defaults(self, values) -> None:
        """The gates are parameters (learnable in training): they take the values too."""
        super().set_defaults(values)
        for layer, gate in zip(self.trans4.attention_layers, values["gate"], strict=True):
            layer.gate.data.fill_(gate)

    def defaults(self) -> dict[str, SettingValue]:
        return {**super().defaults(), "gate": self.trans4.stored_gates()}

    @property
    def tokens(self) -> int:
        return self.trans4.grid**2

    @property
    def default_token_threshold(self) -> float:
        return float(self.setting_values.get("token_threshold", 0.9))

    @property
    def depth(self) -> int:
        return len(self.trans4.transformer.layers)

    def _one_at_a_time(self, batch: torch.Tensor) -> bool:
        """At inference on the CPU, images go through one by one: batching gains no speed
        there, and tensors of several images exceed what malloc reuses, so each pass would
        fault fresh pages (docs/performance.md). Training keeps batches for BatchNorm."""
        return batch.device.type == "cpu" and batch.shape[0] > 1 and not self.training

    def encode(self, x: torch.Tensor) -> EncodedSlices:
        _check_input(x, self.in_channels, self.input_size)
        if self._one_at_a_time(x):
            return EncodedSlices.cat([self.encode(x[i : i + 1]) for i in range(x.shape[0])])
        x1 = self.inc(x.contiguous(memory_format=torch.channels_last))
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        skip_parts = (self.up2.skip_part(x3), self.up3.skip_part(x2), self.up4.skip_part(x1))
        return EncodedSlices(x4, self.trans4.pred_class(x4), skip_parts)

    def run_decoder(
        self,
        encoded: EncodedSlices,
        token_threshold: float | None = None,
        gate: float | Sequence[float] | None = None,
        capture: bool = False,
        content_attention: bool = False,
        keep_inputs: bool = False,
    ) -> ModelOutput:
        """keep_inputs: keep each layer's normed input in its trace, for attention_rows."""
        if self._one_at_a_time(encoded.x4):
            settings = (token_threshold, gate, capture, content_attention, keep_inputs)
            parts = [
                self.run_decoder(encoded.select(slice(i, i + 1)), *settings)
                for i in range(encoded.x4.shape[0])
            ]
            return ModelOutput.cat(parts)
        keep = self.keep_mask(encoded.token_logits, token_threshold)
        gates = self.gate_values(gate, encoded.x4)
        out = self.trans4(
            encoded.x4, keep, gates, capture, content_attention, encoded.first_layer, keep_inputs
        )
        y = self.conv4(out.features)
        y = self.up2(y, encoded.skip_parts[0])
        y = self.up3(y, encoded.skip_parts[1])
        y = self.up4(y, encoded.skip_parts[2])
        logits = self.outc(y)
        if self.pixel_head is not None:
            logits = logits + self.pixel_head(y)
        return ModelOutput(logits, encoded.token_logits, keep, out.traces, out.first_layer_reused)

    def forward(
        self,
        x: torch.Tensor,
        token_threshold: float | None = None,
        gate: float | Sequence[float] | None = None,
        capture: bool = False,
        content_attention: bool = False,
        keep_inputs: bool = False,
    ) -> ModelOutput:
        """x: (B, in_channels, S, S) scaled to [0, 1] (S: the input size, 256 in the release).

        token_threshold: tau_q in (0, 1]; a token whose background probability is >= tau_q is
        pruned; 1.0 keeps every token. gate: one value for all layers or one per layer.
        None takes the model's defaults (the checkpoint's own values).
        """
        settings = (token_threshold, gate, capture, content_attention, keep_inputs)
        if self._one_at_a_time(x):  # each image all the way through: batch 1's memory
            return ModelOutput.cat([self(x[i : i + 1], *settings) for i in range(x.shape[0])])
        return self.run_decoder(self.encode(x), *settings)

    def attention_rows(
        self,
        layer_inputs: Sequence[torch.Tensor],
        tokens: Sequence[int],
        gates: Sequence[float],
    ) -> list[AttentionRecord]:
        """Per layer, the attention of query `tokens`, from the layer inputs that a run decoded
        with keep_inputs=True kept in its traces: (B, H, q, N) after and before pruning."""
        index = torch.as_tensor(list(tokens), dtype=torch.long)
        records = []
        for x, attention, gate in zip(
            layer_inputs, self.trans4.attention_layers, gates, strict=True
        ):
            gate_tensor = torch.tensor(float(gate), dtype=x.dtype, device=x.device)
            records.append(attention.attention_rows(x, index.to(x.device), gate_tensor))
        return records

    def set_learnable_gates(self, learnable: bool, temperature: float = 0.02) -> None:
        """Beyond the release: let training move the gates and the ratio layers (a
        straight-through estimator through the hard dependency mask)."""
        for layer in self.trans4.attention_layers:
            layer.gate.requires_grad_(learnable)
            layer.gate_temperature = temperature if learnable else None

    @staticmethod
    def soft_kept_dependencies(output: ModelOutput) -> torch.Tensor:
        """Mean soft kept-dependency fraction over layers (a training penalty)."""
        values = [t.soft_kept for t in output.layers if t.soft_kept is not None]
        if not values:
            raise ValueError("no soft kept fractions: train with set_learnable_gates(True)")
        return torch.stack(values).mean()

    def add_first_layer(self, encoded: EncodedSlices, gate: float) -> None:
        """Compute and attach layer 1's output for every token at `gate` (see EncodedSlices)."""
        encoded.first_layer = self.trans4.first_layer_all(encoded.x4, gate)

    def keep_mask(self, token_logits: torch.Tensor, token_threshold: float | None) -> torch.Tensor:
        tau = self.default_token_threshold if token_threshold is None else token_threshold
        check_token_threshold(tau)
        if tau >= 1.0:
            return torch.ones(
                token_logits.shape[0], self.tokens, dtype=torch.bool, device=token_logits.device
            )
        background = torch.softmax(token_logits, dim=1)[:, BACKGROUND]
        return (background < tau).flatten(1)

    def gate_values(self, gate: float | Sequence[float] | None, like: torch.Tensor) -> torch.Tensor:
        """(depth,) gates: the stored ones by default, or one value for all, or one per layer."""
        if gate is None:  # the parameters themselves: learnable gates get their gradient
            gates = [layer.gate for layer in self.trans4.attention_layers]
            return torch.stack(gates).to(dtype=like.dtype, device=like.device)
        if isinstance(gate, int | float):
            values = [float(gate)] * self.depth
        else:
            values = [float(g) for g in gate]
            if len(values) != self.depth:
                raise InputError(f"gate: expected 1 or {self.depth} values, got {len(values)}")
        return torch.tensor(values, dtype=like.dtype, device=like.device)


def check_token_threshold(tau: float) -> None:
    if not 0.0 < tau <= 1.0:
        raise InputError(f"token_threshold must be in (0, 1], got {tau}")


def _check_input(x: torch.Tensor, in_channels: int, size: int) -> None:
    expected = (in_channels, size, size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"APFormer expects input of shape (B, {in_channels}, {size}, {size}), got "
            f"{tuple(x.shape)}"
        )
