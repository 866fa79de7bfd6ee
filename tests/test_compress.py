"""Joint search compression (issue 15): factors, the search, budgets, extraction, the card,
`apformer compress`. Tiny APFormer sizes and random data throughout."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.compress.budget import Budget, keep_masks, select
from napari_apformer.compress.capability import JointSearch, joint_search
from napari_apformer.compress.pipeline import (
    CompressConfig,
    FinetuneConfig,
    compress,
    extract,
    save_atomically,
)
from napari_apformer.compress.search import SearchConfig, search
from napari_apformer.errors import InputError
from napari_apformer.model.base import SegmentationModel, build_model
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
ALL = ("head_channels", "heads", "mlp_hidden")
FLOORS = {"head_channels": 1, "heads": 1, "mlp_hidden": 1}
NO_AUGMENTATION = Augmentation(clean_probability=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine its spin-waits
    make each pass many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    model = build_model("apformer", 1, 3, sizes=TINY).eval()
    # Non-trivial BatchNorm statistics and position bias, so that slicing errors show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        for layer in model.trans4.attention_layers:
            layer.relative_position_bias_table.normal_(0, 0.1)
    return model


def slices(n: int, seed: int = 0) -> SliceSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 64, 64, generator=g)
    masks = torch.randint(0, 3, (n, 64, 64), generator=g)
    return SliceSet(images, masks, [f"s{i}" for i in range(n)])


def randomise(factors) -> None:
    with torch.no_grad():
        for layers in factors.values():
            for z in layers:
                z.uniform_(-1.5, 1.5)


def zero_removed(model, selection) -> None:
    """The masked search model: factors of removed units set to 0."""
    with torch.no_grad():
        for name, layers in model.search_factors().items():
            for z, mask in zip(layers, selection.keep[name], strict=True):
                z.mul_(mask.to(z.dtype))


def logits(model, x, **settings) -> torch.Tensor:
    with torch.inference_mode():
        return model.predict(x, **settings).logits


def test_apformer_offers_the_capability():
    model = tiny()
    assert isinstance(model, JointSearch)
    assert model.searchable_dimensions() == {
        "head_channels": [8, 4],
        "heads": [2, 3],
        "mlp_hidden": [16, 12],
    }
    factors = model.add_search_factors(ALL)
    assert {k: [z.numel() for z in v] for k, v in factors.items()} == (
        model.searchable_dimensions()
    )
    with pytest.raises(InputError, match="no searchable dimension"):
        tiny().add_search_factors(["tokens"])


def test_factors_of_one_leave_the_output_unchanged():
    model = tiny()
    x = torch.rand(2, 1, 64, 64)
    before = [logits(model, x), logits(model, x, token_threshold=1.0)]
    model.add_search_factors(ALL)
    after = [logits(model, x), logits(model, x, token_threshold=1.0)]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    model.remove_search_factors()
    assert torch.equal(logits(model, x), before[0])
    assert not any(".parametrizations." in k for k in model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("dimensions", [ALL, ("head_channels", "mlp_hidden"), ("heads",)])
def test_extracted_model_equals_the_masked_search_model(dimensions):
    model = tiny(1)
    factors = model.add_search_factors(dimensions)
    randomise(factors)
    selection = select(model, factors, Budget(default_keep=0.5, min_keep=FLOORS))
    zero_removed(model, selection)
    slim = extract(model, selection)
    full = model.searchable_dimensions()
    assert sum(map(sum, selection.counts.values())) < sum(map(sum, full.values()))
    x = torch.rand(3, 1, 64, 64)
    for settings in ({}, {"token_threshold": 1.0}, {"gate": [-1.0, 0.5]}):
        expected, got = logits(model, x, **settings), logits(slim, x, **settings)
        assert (got - expected).abs().max() <= 1e-5, settings
    assert [s.scale for s in slim.layer_sizes] == [0.25, 0.5]  # kept, not recomputed
    assert slim.searchable_dimensions() == selection.counts


def test_folded_factors_keep_the_search_models_output_without_removing_anything():
    model = tiny(2)
    randomise(model.add_search_factors(ALL))
    selection = select(model, model.search_factors(), Budget(default_keep=1.0))
    slim = extract(model, selection)
    assert slim.sizes() == model.sizes()
    x = torch.rand(2, 1, 64, 64)
    assert (logits(slim, x) - logits(model, x)).abs().max() <= 1e-5


def test_budget_one_and_no_factors_return_the_original_bit_for_bit():
    check_budget_one_is_bit_for_bit(tiny(3), ALL)


def check_budget_one_is_bit_for_bit(model: SegmentationModel, dimensions) -> None:
    """Budget 1 returns the original tensors and sizes exactly, with no dimension searched
    and with factors at their initial 1 on `dimensions` (shared by every family's tests)."""
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    # No dimension searched (every lambda 0): nothing to rank, everything kept.
    slim = extract(model, select(model, {}, Budget(default_keep=1.0)))
    # Factors at their initial 1 and budget 1: folding multiplies by exactly 1.
    model.add_search_factors(dimensions)
    slim_ones = extract(model, select(model, model.search_factors(), Budget(default_keep=1.0)))
    for candidate in (slim, slim_ones):
        state = candidate.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        assert candidate.sizes() == model.sizes()


def test_extracted_weights_load_through_their_card(tmp_path):
    model = tiny(4)
    randomise(model.add_search_factors(ALL))
    selection = select(model, model.search_factors(), Budget(default_keep=0.6, min_keep=FLOORS))
    slim = extract(model, selection).eval()
    save_atomically(slim, ModelCard.generic("slim", 1, 3), tmp_path / "slim")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.json", "slim.safetensors"]
    loaded = load_model(tmp_path / "slim.safetensors")
    assert loaded.sizes() == slim.sizes() != model.sizes()
    assert loaded.card.architecture["sizes"]["layers"][1]["scale"] == 0.5
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(logits(loaded, x), logits(slim, x))


@pytest.mark.parametrize(
    ("max_params", "max_flops"), [(0.9, None), (None, 0.95), (0.92, 0.97), (0.85, 0.96)]
)
def test_targets_of_params_and_flops_are_met(max_params, max_flops):
    model = tiny(5)
    randomise(model.add_search_factors(["head_channels", "mlp_hidden"]))
    budget = Budget(max_params=max_params, max_flops=max_flops, min_keep=FLOORS)
    selection = select(model, model.search_factors(), budget)
    slim = extract(model, selection)
    params = sum(p.numel() for p in slim.parameters())
    base_params = sum(p.numel() for p in tiny().parameters())
    assert (selection.cost.params, selection.base.params) == (params, base_params)
    # The counted FLOPs of the sliced widths equal torch's count of a real pass.
    counted = SegmentationModel.reference_flops(slim, 64, 64)
    assert selection.cost.flops == slim.reference_flops(64, 64) == counted
    if max_params is not None:
        assert params <= max_params * base_params
    if max_flops is not None:
        assert counted <= max_flops * tiny().reference_flops(64, 64)
    # The largest common fraction: one more unit per dimension would break a target.
    assert selection.fractions["head_channels"] == selection.fractions["mlp_hidden"] < 1.0


def test_flop_counter_agrees_on_a_slim_model():
    model = tiny(6)
    randomise(model.add_search_factors(ALL))
    budget = Budget(default_keep=0.5, min_keep=FLOORS)
    slim = extract(model, select(model, model.search_factors(), budget))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        slim.predict(torch.zeros(1, 1, 64, 64), token_threshold=1.0)
    assert counter.get_total_flops() == slim.reference_flops(64, 64)


def test_keep_masks_threshold_floor_and_rounding():
    values = [torch.tensor([0.9, 0.1, 0.5, 0.7]), torch.tensor([0.05, 0.02, 0.3, 0.2])]
    masks, threshold = keep_masks(values, 0.5)  # the 4 largest of 8
    assert threshold == pytest.approx(0.3)
    assert [m.tolist() for m in masks] == [[True, False, True, True], [False, False, True, False]]
    masks, _ = keep_masks(values, 0.25, floor=2)
    assert [int(m.sum()) for m in masks] == [2, 2]
    assert masks[1].tolist() == [False, False, True, True]  # the floor takes the largest
    masks, _ = keep_masks(values, 0.5, round_to=4)
    assert [int(m.sum()) for m in masks] == [4, 4]
    assert all(m.all() for m in keep_masks(values, 1.0)[0])


def test_bad_budgets_say_what_is_wrong():
    model = tiny()
    model.add_search_factors(["head_channels"])
    factors = model.search_factors()
    for budget, message in [
        (Budget(default_keep=1.5), r"default budget must be in \(0, 1\]"),
        (Budget(keep={"mlp_hidden": 0.0}), r"budget for mlp_hidden must be in \(0, 1\]"),
        (Budget(max_params=float("nan")), "parameters must be in"),
        (Budget(keep={"tokens": 0.5}), "no searchable dimension tokens"),
        (Budget(keep={"mlp_hidden": 0.5}), "mlp_hidden, which was not searched"),
        (Budget(max_params=0.01, min_keep=FLOORS), "the target cannot be met"),
    ]:
        with pytest.raises(InputError, match=message):
            select(model, factors, budget)


def test_a_family_without_searchable_dimensions_is_refused():
    class Plain(SegmentationModel):
        family = "plain"

    with pytest.raises(InputError, match="plain family has no searchable dimensions"):
        joint_search(Plain(1, 2, "default"))


@pytest.mark.slow
def test_l1_drives_the_factors_down():
    model = tiny(7)
    config = SearchConfig(
        lambdas={"head_channels": 0.05, "mlp_hidden": 0.05},
        steps=12,
        batch_size=2,
        learning_rate=0.02,
        ssa_every=4,
        augmentation=NO_AUGMENTATION,
        progress=False,
        device="cpu",
    )
    result = search(model, slices(4), config)
    assert result.steps == 12 and not result.stopped_early
    assert sorted(result.factors) == ["head_channels", "mlp_hidden"]
    for layers in result.factors.values():
        mean = torch.cat([z.abs() for z in layers]).mean()
        assert mean < 0.85  # Adam moves each factor by about lr per step, L1 pushes down
    assert not model.training
    assert result.losses["l1_head_channels"] > 0


@pytest.mark.slow
def test_search_resumes_from_its_state(tmp_path):
    data = slices(4)
    config = SearchConfig(
        lambdas={"mlp_hidden": 1e-3},
        steps=3,
        batch_size=2,
        augmentation=NO_AUGMENTATION,
        progress=False,
        device="cpu",
        state=tmp_path / "s.search-state.pt",
        log=tmp_path / "s.search-log.csv",
        save_every=2,
        identity={"base weights": "abc"},
    )
    first = search(tiny(8), data, config)
    assert first.steps == 3 and config.state.is_file()
    config.steps, config.resume = 5, config.state
    second = search(tiny(8), data, config)
    assert second.steps == 5 and second.seconds >= first.seconds
    rows = config.log.read_text().splitlines()
    assert rows[0].startswith("step,seconds,") and len(rows) == 3  # header, step 3, step 5
    config.identity = {"base weights": "other"}
    with pytest.raises(InputError, match="other base weights"):
        search(tiny(8), data, config)


def test_search_refuses_when_nothing_is_searched():
    with pytest.raises(InputError, match="every L1 weight is 0"):
        search(tiny(), slices(2), SearchConfig(lambdas={"heads": 0.0}, progress=False))
    with pytest.raises(InputError, match="must be 0 or more"):
        search(tiny(), slices(2), SearchConfig(lambdas={"heads": -1.0}, progress=False))


@pytest.mark.slow
def test_compress_writes_a_smaller_model_with_its_provenance(tmp_path):
    base = tiny(9)
    save_weights(base, ModelCard.generic("base", 1, 3), tmp_path / "base")
    model = load_model(tmp_path / "base.safetensors")
    out = tmp_path / "slim"
    config = CompressConfig(
        out=out,
        search=SearchConfig(
            lambdas={"head_channels": 1e-3, "mlp_hidden": 1e-3},
            steps=2,
            batch_size=2,
            augmentation=NO_AUGMENTATION,
            progress=False,
            device="cpu",
        ),
        budget=Budget(max_params=0.95, min_keep=FLOORS),
        finetune=FinetuneConfig(steps=2, steps_per_epoch=2, batch_size=2, ema=0.0),
        base_name="base",
        provenance={"command": "test"},
    )
    summary = compress(model, slices(4), slices(2, seed=1), config)
    assert summary.weights == out.with_suffix(".safetensors")
    assert summary.extracted == tmp_path / "slim-extracted.safetensors"
    for weights in (summary.weights, summary.extracted):
        loaded = load_model(weights)
        assert loaded.sizes() != base.sizes()
        assert sum(p.numel() for p in loaded.parameters()) <= 0.95 * summary.selection.base.params
    card = json.loads(out.with_suffix(".json").read_text())
    compression = card["training"]["compression"]
    assert compression["base_weights"] == "base"
    assert compression["base_sha256"] == model.card.sha256
    assert compression["search"]["steps_run"] == 2
    assert compression["dimensions"]["head_channels"]["lambda"] == 1e-3
    assert compression["params_fraction"] <= 0.95
    assert compression["finetune"]["steps"] == 2
    assert "finetune_seconds" in compression["finetune"]
    assert card["training"]["command"] == "test" and "hardware" in card["training"]
    assert card["architecture"]["sizes"] == load_model(summary.weights).sizes()
    assert "validation_mean_foreground_dice" in card["metrics"]


def write_pngs(root, n: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        image = (rng.random((64, 64)) * 255).astype(np.uint8)
        mask = rng.integers(0, 3, (64, 64)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")


@pytest.mark.slow
def test_the_command_runs_end_to_end(tmp_path, capsys):
    from napari_apformer.compress import command

    base = tiny(10)
    base_card = ModelCard.generic("base", 1, 3)
    base_card.limits = ["test scans only"]
    base_card.made_for = {"modality": "MR", "contrasts": ["T1w"]}
    save_weights(base, base_card, tmp_path / "base")
    write_pngs(tmp_path / "data")
    parser = argparse.ArgumentParser(prog="apformer")
    command.add_parser(parser.add_subparsers())
    out = tmp_path / "out" / "slim"
    argv = [
        "compress",
        "--images",
        str(tmp_path / "data"),
        "--val-fraction",
        "0.34",
        "--weights",
        str(tmp_path / "base.safetensors"),
        "-o",
        str(out),
        "--target-params",
        "0.97",
        "--min-keep",
        "head_channels=1",
        "--min-keep",
        "mlp_hidden=1",
        "--lambda",
        "head_channels=1e-3",
        "--search-steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
        "--no-base-validation",
        "--device",
        "cpu",
    ]
    args = parser.parse_args(argv)
    args.command_line = argv
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "kept per layer" in printed and "validation mean Dice" in printed
    loaded = load_model(out.with_suffix(".safetensors"))
    assert sum(p.numel() for p in loaded.parameters()) <= 0.97 * sum(
        p.numel() for p in base.parameters()
    )
    assert out.with_suffix(".search-state.pt").is_file()
    assert out.with_suffix(".search-log.csv").is_file()
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["command"].startswith("apformer compress --images")
    # What the base was (not) made for still holds for the slimmer network.
    assert card["limits"] == ["test scans only"] and card["made_for"] == base_card.made_for
    # The same search, extracted at another budget without searching again.
    again = tmp_path / "out" / "slim-half"
    argv = [a if a != str(out) else str(again) for a in argv]
    argv = [a if a != "0.97" else "0.9" for a in argv]
    args = parser.parse_args([*argv, "--resume", str(out.with_suffix(".search-state.pt"))])
    args.command_line = argv
    assert args.run(args) == 0
    smaller = load_model(again.with_suffix(".safetensors"))
    assert sum(p.numel() for p in smaller.parameters()) < sum(
        p.numel() for p in loaded.parameters()
    )
    plain = ["compress", "--images", str(tmp_path / "data"), "-o", str(tmp_path / "x")]
    plain += ["--weights", str(tmp_path / "base.safetensors")]
    for bad, message in [
        (["--budget", "0.5", "--target-params", "0.5"], "not both"),
        (["--budget", "1.5"], r"must be in \(0, 1\]"),
        (["--keep", "heads"], "NAME=VALUE"),
        (["--lambda", "tokens=1"], "no searchable dimension tokens"),
        (["--target-params", "0.5"], "the target cannot be met"),  # the floors alone exceed it
        (["--lambda", "head_channels=0", "--lambda", "mlp_hidden=0"], "every L1 weight is 0"),
    ]:
        args = parser.parse_args([*plain, *bad])
        with pytest.raises(InputError, match=message):
            args.run(args)


def test_apformer_compress_is_a_command(capsys):
    from napari_apformer.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["compress", "--help"])
    assert stop.value.code == 0
    assert "--target-params" in capsys.readouterr().out


def test_compress_takes_the_data_options_and_checks_of_train(tmp_path):
    """One definition (train.command.add_data_arguments): the same names, defaults and split
    seed as `apformer train`, and the same one-line refusals, before the weights are read."""
    from napari_apformer.compress import command
    from napari_apformer.train.command import add_train_parser

    parser = argparse.ArgumentParser(prog="apformer")
    commands = parser.add_subparsers()
    command.add_parser(commands)
    add_train_parser(commands)
    data = ["--images", str(tmp_path / "data"), "-o", str(tmp_path / "out")]
    compress_args = parser.parse_args(["compress", *data])
    train_args = parser.parse_args(["train", *data])
    for name in ("mni152", "images", "nifti", "release", "axes", "val_fraction", "seed"):
        assert getattr(compress_args, name) == getattr(train_args, name)
    missing = str(tmp_path / "missing.safetensors")  # the data options fail first
    for bad, message in [
        (["--val-fraction", "1.5"], "--val-fraction takes a fraction between 0 and 1"),
        (["--val-fraction", "0"], "--val-fraction takes a fraction between 0 and 1"),
        (["--axes", "x"], "--axes takes distinct slice axes 0, 1 or 2"),
        (["--axes", "2,2"], "--axes takes distinct slice axes 0, 1 or 2"),
        (["--seed", "-1"], "--seed takes 0 or more, not -1"),
        (["--threads", "-1"], "--threads takes a number of CPU threads"),  # as train's
        (["--device", "meta"], "--device: unknown device 'meta'"),
    ]:
        args = parser.parse_args(["compress", *data, "--weights", missing, *bad])
        with pytest.raises(InputError, match=message):
            args.run(args)
    with pytest.raises(SystemExit):  # one data set only, as in train
        parser.parse_args(["compress", *data, "--nifti", str(tmp_path)])
