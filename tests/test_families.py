"""Contract tests over every registered model family, and a toy second family defined only
here (a tiny conv net) that runs through the engine, the card and the CLI with no change
outside this file."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.engine.inference import Segmenter
from napari_apformer.errors import InputError
from napari_apformer.model import base
from napari_apformer.model.base import (
    CounterSpec,
    InputRule,
    MapSpec,
    Prediction,
    SegmentationModel,
    Setting,
    Trainable,
    build_model,
)
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights


class ToyConvNet(SegmentationModel):
    """Two 3 x 3 convolutions; a "sharpness" setting scales the logits; one map (the
    per-cell maximum probability on 4 x 4 cells) and one counter (confident pixels)."""

    family = "toy-conv"
    variants: ClassVar = {"default": {"width": 6}, "wide": {"width": 12}}

    def __init__(self, in_channels: int, n_classes: int, variant: str, width: int) -> None:
        super().__init__(in_channels, n_classes, variant)
        self.width = width
        self.toy_stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.toy_head = nn.Conv2d(width, n_classes, 3, padding=1)

    @property
    def input_rule(self) -> InputRule:
        return InputRule(multiple=4)

    def sizes(self) -> dict:
        return {"width": self.width}

    @classmethod
    def from_sizes(cls, in_channels, n_classes, variant, sizes) -> ToyConvNet:
        return cls(in_channels, n_classes, variant, int(sizes["width"]))

    @classmethod
    def recognise(cls, state) -> dict | None:
        if "toy_stem.weight" not in state:
            return None
        stem, head = state["toy_stem.weight"], state["toy_head.weight"]
        return {
            "in_channels": int(stem.shape[1]),
            "n_classes": int(head.shape[0]),
            "variant": "default",
            "sizes": {"width": int(stem.shape[0])},
        }

    def declared_settings(self) -> list[Setting]:
        return [Setting("sharpness", "sharpness", 0.1, 10.0, 1.0, "scales the logits")]

    def map_specs(self) -> list[MapSpec]:
        return [MapSpec("confidence", "confidence", 4, "probability")]

    def counter_specs(self) -> list[CounterSpec]:
        return [CounterSpec("confident_pixels", "confident pixels")]

    def predict(self, x: torch.Tensor, want_attention: bool = False, **settings) -> Prediction:
        self.input_rule.check(*x.shape[-2:])
        sharpness = self.resolve_settings(settings)["sharpness"]
        logits = self.toy_head(F.relu(self.toy_stem(x))) * sharpness
        top = torch.softmax(logits, dim=1).amax(dim=1)
        pixels = top[0].numel()
        confident = (top > 0.9).flatten(1).sum(dim=1)
        height, width = x.shape[-2:]
        per_image = 2 * 9 * height * width * self.width * (self.in_channels + self.n_classes)
        return Prediction(
            logits=logits,
            maps={"confidence": F.max_pool2d(top[:, None], 4)[:, 0]},
            counters={
                "confident_pixels": torch.stack([confident, torch.full_like(confident, pixels)], 1)
            },
            flops=torch.full((x.shape[0],), per_image, dtype=torch.int64),
        )


SMALL_APFORMER = {
    "input_size": 64,
    "widths": [4, 8, 8, 16],
    "layers": [  # layers of different sizes, as compression leaves them
        {"heads": 2, "dim_head": 8, "mlp": 16, "scale": 0.25},
        {"heads": 1, "dim_head": 4, "mlp": 8, "scale": 0.5},
    ],
}
SMALL = {
    "apformer": SMALL_APFORMER,
    "mobileutr": {"depths": [1, 1, 1, 1, 1]},  # the default widths: its tensors give its heads
    "mobileutr-ap": {"depths": [1, 1, 1, 1, 2]},  # two pruned blocks: per-layer gates
    "toy-conv": {"width": 5},
}


@pytest.fixture
def toy_family(monkeypatch):
    """Registers the toy family for one test only."""
    monkeypatch.setitem(base._FAMILIES, ToyConvNet.family, ToyConvNet)
    return ToyConvNet


def family_names() -> list[str]:
    return sorted({*base.families(), ToyConvNet.family})


@pytest.fixture(params=family_names())
def small_model(request, toy_family) -> SegmentationModel:
    torch.manual_seed(0)
    model = build_model(request.param, 2, 3, sizes=SMALL[request.param])
    return model.eval()


def _input_for(model: SegmentationModel, batch: int = 2) -> torch.Tensor:
    rule = model.input_rule
    size = rule.size or 5 * rule.multiple
    return torch.rand(batch, model.in_channels, size, size)


def test_every_shipped_family_is_in_the_contract():
    assert set(base.families()) <= set(SMALL), "give each new family small sizes in SMALL"


def test_prediction_shapes_and_no_nan(small_model):
    x = _input_for(small_model)
    with torch.inference_mode():
        out = small_model.predict(x)
    assert out.logits.shape == (2, 3, *x.shape[-2:])
    assert torch.isfinite(out.logits).all()
    names = {s.name for s in small_model.map_specs()}
    assert set(out.maps) == names
    for spec in small_model.map_specs():
        grid = (x.shape[-2] // spec.stride, x.shape[-1] // spec.stride)
        assert out.maps[spec.name].shape == (2, *grid)
    assert set(out.counters) == {c.name for c in small_model.counter_specs()}
    for pair in out.counters.values():
        assert pair.shape == (2, 2) and (pair[:, 0] <= pair[:, 1]).all()


def test_counted_flops_equal_torch_flop_counter(small_model):
    x = _input_for(small_model, batch=1)
    low = {s.name: s.low + (s.high - s.low) / 2 for s in small_model.settings()}
    for settings in ({}, low):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            out = small_model.predict(x, **settings)
        assert int(out.flops[0]) == counter.get_total_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        small_model.predict(x, **small_model.unpruned_settings())
    assert small_model.reference_flops(*x.shape[-2:]) == counter.get_total_flops()


@pytest.mark.parametrize("family", family_names())
def test_engine_equals_model_on_a_grey_slice(family, toy_family):
    torch.manual_seed(1)
    model = build_model(family, 1, 3, sizes=SMALL[family]).eval()
    segmenter = Segmenter(model, device="cpu")
    x = _input_for(model, batch=1)
    prepared = segmenter.prepare(x[0, 0].numpy())
    prepared.low, prepared.high = 0.0, 1.0
    result = segmenter.segment(prepared, probabilities=True)
    with torch.inference_mode():
        out = model.predict(x)
    assert np.array_equal(result.labels, out.logits[0].argmax(0).numpy())
    for name, values in out.maps.items():
        np.testing.assert_allclose(result.maps[name][0], values[0].float().numpy(), atol=1e-6)
    assert result.stats.slices == 1 and result.stats.flops == int(out.flops[0])


def test_card_and_state_dict_round_trip(small_model, tmp_path):
    card = ModelCard.generic("small", small_model.in_channels, small_model.n_classes)
    save_weights(small_model, card, tmp_path / "small")
    written = json.loads((tmp_path / "small.json").read_text())
    assert written["card_version"] == 2
    assert written["architecture"] == small_model.architecture()
    loaded = load_model(tmp_path / "small.safetensors")
    assert type(loaded) is type(small_model)
    assert loaded.architecture() == small_model.architecture()
    x = _input_for(small_model)
    with torch.inference_mode():
        assert torch.equal(loaded.predict(x).logits, small_model.predict(x).logits)
    # without a card, the family and sizes are recognised from the tensors
    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    assert load_model(state).architecture()["family"] == small_model.family


def test_trainable_families_give_finite_losses_and_cover_every_parameter(small_model):
    if not isinstance(small_model, Trainable):
        pytest.skip(f"{small_model.family} offers no training losses")
    small_model.train()
    x = _input_for(small_model)
    target = torch.randint(0, small_model.n_classes, (x.shape[0], *x.shape[-2:]))
    losses = small_model.training_losses(x, target, step=0)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    grouped = [p for group in small_model.parameter_groups(1e-3) for p in group["params"]]
    trainable = [p for p in small_model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_settings_are_checked_and_named(small_model):
    for setting in small_model.settings():
        with pytest.raises(InputError, match=setting.name):
            small_model.resolve_settings({setting.name: float("nan")})
        with pytest.raises(InputError, match=setting.name):
            small_model.resolve_settings({setting.name: setting.high + 1})
    with pytest.raises(InputError, match="unknown setting"):
        small_model.resolve_settings({"no_such_setting": 1.0})


def test_unknown_family_lists_the_known_ones(tmp_path, official_model):
    card = ModelCard.generic("x", 1, 9)
    save_weights(official_model, card, tmp_path / "x")
    written = json.loads((tmp_path / "x.json").read_text())
    written["architecture"]["family"] = "no-such-family"
    (tmp_path / "x.json").write_text(json.dumps(written))
    with pytest.raises(InputError, match=r"known families: apformer"):
        load_model(tmp_path / "x.safetensors")


def test_version_1_cards_load_as_apformer(tmp_path, official_model):
    save_weights(official_model, ModelCard.generic("old", 1, 9), tmp_path / "old")
    card = json.loads((tmp_path / "old.json").read_text())
    settings = card.pop("settings")
    del card["architecture"]
    card.update(card_version=1, token_threshold=0.7, gates=settings["gate"])
    (tmp_path / "old.json").write_text(json.dumps(card))
    model = load_model(tmp_path / "old.safetensors")
    assert model.family == "apformer" and model.settings()[0].default == 0.7


def test_a_narrower_apformer_loads_when_its_card_says_so(tmp_path):
    torch.manual_seed(2)
    model = build_model("apformer", 1, 4, sizes=SMALL_APFORMER).eval()
    save_weights(model, ModelCard.generic("slim", 1, 4), tmp_path / "slim")
    loaded = load_model(tmp_path / "slim.safetensors")
    assert [s.heads for s in loaded.layer_sizes] == [2, 1]
    assert [s.scale for s in loaded.layer_sizes] == [0.25, 0.5]  # recorded, not recomputed
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.predict(x).logits, model.predict(x).logits)


def test_toy_family_runs_through_the_cli(toy_family, tmp_path, capsys):
    from napari_apformer.cli import main

    torch.manual_seed(3)
    model = build_model("toy-conv", 1, 3).eval()
    save_weights(model, ModelCard.generic("toy", 1, 3), tmp_path / "toy")
    import nibabel as nib

    data = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "image.nii.gz")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(tmp_path / "image.nii.gz"),
            "--weights",
            str(tmp_path / "toy.safetensors"),
            "--set",
            "sharpness=2",
            "-o",
            str(out),
        ]
    )
    assert code in (0, None)
    labels = nib.load(next(out.glob("*.nii*"))).get_fdata()
    assert labels.shape == data.shape and set(np.unique(labels)) <= {0, 1, 2}
    sidecars = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert any(s.get("settings", {}).get("sharpness") == 2.0 for s in sidecars)
    assert main(["info", str(tmp_path / "toy.safetensors")]) in (0, None)
    printed = capsys.readouterr().out
    assert "toy-conv" in printed and "sharpness" in printed
