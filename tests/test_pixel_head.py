"""Our pixel classification module for compression (issue 15; docs/compression.md): an
optional part of APFormer's sizes, zero at the start, counted in the FLOPs, kept by
compression. Tiny APFormer sizes and random data."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.compress.budget import Budget
from napari_apformer.compress.pipeline import CompressConfig, FinetuneConfig, compress
from napari_apformer.compress.search import SearchConfig
from napari_apformer.errors import InputError
from napari_apformer.model.apformer.flops import decoder_flops
from napari_apformer.model.base import build_model
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights
from napari_apformer.train.augment import Augmentation
from napari_apformer.train.datasets import SliceSet

TINY = {
    "input_size": 64,
    "widths": [4, 8, 8, 16],
    "layers": [
        {"heads": 2, "dim_head": 8, "mlp": 16, "scale": 0.25},
        {"heads": 3, "dim_head": 4, "mlp": 12, "scale": 0.5},
    ],
}
FLOORS = {"head_channels": 1, "heads": 1, "mlp_hidden": 1}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = build_model("apformer", 1, 3, sizes={**TINY, **extra}).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def with_trained_head(seed: int = 0):
    """A model whose head is not zero (as after training), so that a lost head shows."""
    model = tiny(seed, pixel_head=5)
    with torch.no_grad():
        for p in model.pixel_head.parameters():
            p.normal_(0, 0.5)
    return model


def logits(model, x, **settings) -> torch.Tensor:
    with torch.inference_mode():
        return model.predict(x, **settings).logits


def slices(n: int, seed: int = 0) -> SliceSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 64, 64, generator=g)
    masks = torch.randint(0, 3, (n, 64, 64), generator=g)
    return SliceSet(images, masks, [f"s{i}" for i in range(n)])


def test_absent_the_network_has_no_trace_of_it():
    model = tiny()
    assert model.pixel_head is None and "pixel_head" not in model.sizes()
    assert not any(k.startswith("pixel_head") for k in model.state_dict())
    with_head = tiny(pixel_head=4)
    extra = {k for k in with_head.state_dict() if k.startswith("pixel_head.")}
    assert set(with_head.state_dict()) - extra == set(model.state_dict())
    # Conv 4->4 without bias, BatchNorm (2 x 4), conv 4->3 with bias.
    assert sum(p.numel() for p in with_head.pixel_head.parameters()) == 16 + 8 + 12 + 3


def test_added_head_leaves_the_search_models_output_equal_to_the_base():
    base = tiny(1)
    x = torch.rand(2, 1, 64, 64)
    before = [logits(base, x), logits(base, x, token_threshold=1.0)]
    head = base.add_pixel_head()
    assert head.net[0].out_channels == 4  # the last decoder map's width by default
    assert torch.count_nonzero(head.net[0].weight) > 0  # only the last convolution is zero
    base.add_search_factors(["head_channels", "mlp_hidden"])
    after = [logits(base, x), logits(base, x, token_threshold=1.0)]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already has"):
        base.add_pixel_head()


def test_a_trained_head_changes_the_output():
    """The head's logits are added: with non-zero weights the output moves."""
    model = with_trained_head(2)
    x = torch.rand(1, 1, 64, 64)
    before = logits(model, x)
    with torch.no_grad():
        model.pixel_head.net[3].weight.zero_()
        model.pixel_head.net[3].bias.zero_()
    plain = tiny(2)
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("pixel_head.")}
    )
    assert torch.equal(logits(model, x), logits(plain, x))
    assert (before - logits(plain, x)).abs().max() > 1e-3


def test_card_round_trip_rebuilds_the_head(tmp_path):
    model = with_trained_head(3)
    save_weights(model, ModelCard.generic("headed", 1, 3), tmp_path / "headed")
    card = json.loads((tmp_path / "headed.json").read_text())
    assert card["architecture"]["sizes"]["pixel_head"] == 5
    loaded = load_model(tmp_path / "headed.safetensors")
    assert loaded.pixel_head is not None and loaded.sizes() == model.sizes()
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "16"])
def test_malformed_pixel_head_sizes_are_refused(value):
    with pytest.raises(InputError, match="pixel_head must be a positive number"):
        build_model("apformer", 1, 3, sizes={**TINY, "pixel_head": value})


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_counted_flops_include_the_head_and_equal_torchs(tau):
    model = with_trained_head(4)
    without = tiny(4)
    x = torch.rand(1, 1, 64, 64)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        out = model.predict(x, token_threshold=tau)
    assert int(out.flops[0]) == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.predict(x, token_threshold=1.0)
    assert model.reference_flops(64, 64) == counter.get_total_flops()
    # Two 1x1 convolutions over 64 x 64 pixels: 4 -> 5 and 5 -> 3.
    assert model.reference_flops(64, 64) - without.reference_flops(64, 64) == (
        2 * 64 * 64 * (4 * 5 + 5 * 3)
    )
    # The decoder alone (what a threshold change reruns), with layer 1 from the cache.
    with torch.inference_mode():
        encoded = model.encode(x)
        model.add_first_layer(encoded, -1.0)
        with FlopCounterMode(display=False) as counter:
            out = model.run_decoder(encoded, tau, gate=-1.0)
    kept = int(out.keep.sum())
    assert decoder_flops(model, kept, first_layer_reused=True) == counter.get_total_flops()


@pytest.mark.slow
def test_compress_with_the_head_trains_keeps_and_records_it(tmp_path):
    base = tiny(5)
    save_weights(base, ModelCard.generic("base", 1, 3), tmp_path / "base")
    model = load_model(tmp_path / "base.safetensors")
    out = tmp_path / "slim"
    config = CompressConfig(
        out=out,
        search=SearchConfig(
            lambdas={"head_channels": 1e-3, "mlp_hidden": 1e-3},
            steps=3,
            batch_size=2,
            augmentation=Augmentation(clean_probability=1.0),
            progress=False,
            device="cpu",
            learning_rate=1e-2,
        ),
        budget=Budget(max_params=0.95, min_keep=FLOORS),
        finetune=FinetuneConfig(steps=2, steps_per_epoch=2, batch_size=2, ema=0.0),
        evaluate_base=False,
        pixel_head=True,
    )
    summary = compress(model, slices(4), slices(2, seed=1), config)
    base_params = sum(p.numel() for p in base.parameters())
    assert summary.selection.base.params == base_params  # fractions of the base's own size
    for weights in (summary.extracted, summary.weights):
        loaded = load_model(weights)
        head = loaded.pixel_head
        assert head is not None and loaded.sizes()["pixel_head"] == 4
        assert torch.count_nonzero(head.net[3].weight) > 0  # the search trained it
        assert sum(p.numel() for p in loaded.parameters()) <= 0.95 * base_params
        prediction = loaded.predict(torch.rand(2, 1, 64, 64))
        assert prediction.logits.shape == (2, 3, 64, 64)
        assert torch.isfinite(prediction.logits).all()
    card = json.loads(out.with_suffix(".json").read_text())
    record = card["training"]["compression"]["pixel_classification_module"]
    assert record["added_by_this_run"] is True and record["hidden_channels"] == 4
    assert record["parameters"] == 16 + 8 + 12 + 3 and record["design"].startswith("ours")
    assert card["architecture"]["sizes"]["pixel_head"] == 4


@pytest.mark.slow
def test_the_command_adds_the_head_and_a_resume_must_agree(tmp_path):
    import argparse

    from napari_apformer.compress import command
    from test_compress import write_pngs

    save_weights(tiny(6), ModelCard.generic("base", 1, 3), tmp_path / "base")
    write_pngs(tmp_path / "data")
    parser = argparse.ArgumentParser(prog="apformer")
    command.add_parser(parser.add_subparsers())
    out = tmp_path / "slim"
    argv = ["compress", "--images", str(tmp_path / "data"), "--val-fraction", "0.34"]
    argv += ["--weights", str(tmp_path / "base.safetensors"), "-o", str(out), "--budget", "0.5"]
    argv += ["--min-keep", "head_channels=1", "--min-keep", "mlp_hidden=1", "--search-steps"]
    argv += ["1", "--batch-size", "2", "--no-progress", "--no-base-validation", "--device", "cpu"]
    args = parser.parse_args([*argv, "--pixel-head"])
    args.command_line = argv
    assert args.run(args) == 0
    loaded = load_model(out.with_suffix(".safetensors"))
    assert loaded.sizes()["pixel_head"] == 4
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["compression"]["pixel_classification_module"]["added_by_this_run"]
    state = str(out.with_suffix(".search-state.pt"))
    args = parser.parse_args([*argv, "--resume", state])  # the head left out: another search
    args.command_line = argv
    with pytest.raises(InputError, match="other pixel head"):
        args.run(args)
