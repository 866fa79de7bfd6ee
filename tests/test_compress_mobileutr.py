"""Joint search compression of MobileUtr (issue 15; spec b.2): its factors, slicing, FLOPs,
card round trip and `apformer compress` on a tiny network (MobileUtr's widths, one block per
embedding stage, one LGL block and two transformer blocks) with random data."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.compress.budget import Budget, select
from napari_apformer.compress.capability import JointSearch, joint_search
from napari_apformer.compress.pipeline import extract, save_atomically
from napari_apformer.errors import InputError
from napari_apformer.model.base import SegmentationModel, build_model
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights
from test_compress import (  # noqa: F401 (one_thread: an autouse fixture)
    check_budget_one_is_bit_for_bit,
    logits,
    one_thread,
    randomise,
    write_pngs,
    zero_removed,
)

DEPTHS = [1, 1, 1, 1, 2]
ALL = ("head_channels", "mlp_hidden")
FLOORS = {"head_channels": 1, "mlp_hidden": 1}


def tiny(seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    model = build_model("mobileutr", 1, 3, sizes={"depths": DEPTHS}).eval()
    # Non-trivial normalisation statistics and affine terms, so that slicing errors show.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model


def masked_and_sliced(seed: int, fraction: float):
    model = tiny(seed)
    randomise(model.add_search_factors(ALL))
    budget = Budget(default_keep=fraction, min_keep=FLOORS)
    selection = select(model, model.search_factors(), budget)
    zero_removed(model, selection)
    return model, selection, extract(model, selection)


def test_mobileutr_offers_the_capability_and_mobileutr_ap_refuses():
    model = tiny()
    assert isinstance(model, JointSearch)
    # LGL block (64 wide, 4 heads of 16), then the transformer blocks (128, 4 x 32).
    assert model.searchable_dimensions() == {
        "head_channels": [16, 32, 32],
        "mlp_hidden": [256, 512, 512],
    }
    factors = model.add_search_factors(ALL)
    assert {k: [z.numel() for z in v] for k, v in factors.items()} == (
        model.searchable_dimensions()
    )
    assert set(model.search_defaults()) == set(ALL)
    with pytest.raises(InputError, match="no searchable dimension heads"):
        tiny().add_search_factors(["heads"])
    ap = build_model("mobileutr-ap", 1, 3, sizes={"depths": DEPTHS})
    with pytest.raises(InputError, match="mobileutr-ap family has no searchable dimensions"):
        joint_search(ap)


@pytest.mark.slow
def test_factors_of_one_leave_the_output_unchanged():
    model = tiny(1)
    x = torch.rand(2, 1, 64, 64)
    before = logits(model, x)
    model.add_search_factors(ALL)
    assert torch.equal(logits(model, x), before)
    model.remove_search_factors()
    assert torch.equal(logits(model, x), before)
    assert not any(".parametrizations." in k for k in model.state_dict())


@pytest.mark.slow
def test_extracted_model_equals_the_masked_search_model():
    model, selection, slim = masked_and_sliced(2, 0.5)
    counts = selection.counts
    assert sum(map(sum, counts.values())) < sum(map(sum, model.searchable_dimensions().values()))
    x = torch.rand(2, 1, 64, 64)
    assert (logits(slim, x) - logits(model, x)).abs().max() <= 1e-5
    assert slim.searchable_dimensions() == counts
    lgl, *transformer = slim.block_sizes
    assert lgl.dim_v == 16 and lgl.scale == 16**-0.5  # V is not searched in the LGL stage
    assert [(b.dim_v, b.scale) for b in transformer] == [(b.dim_qk, 32**-0.5) for b in transformer]
    assert sum(p.numel() for p in slim.parameters()) == selection.cost.params


@pytest.mark.slow
def test_folded_factors_keep_the_search_models_output_without_removing_anything():
    model = tiny(3)
    randomise(model.add_search_factors(ALL))
    slim = extract(model, select(model, model.search_factors(), Budget(default_keep=1.0)))
    assert slim.sizes() == model.sizes() and "blocks" not in slim.sizes()
    x = torch.rand(2, 1, 64, 64)
    assert (logits(slim, x) - logits(model, x)).abs().max() <= 1e-5


@pytest.mark.slow
def test_budget_one_and_no_factors_return_the_original_bit_for_bit():
    check_budget_one_is_bit_for_bit(tiny(4), ALL)


@pytest.mark.slow
def test_extracted_weights_load_through_their_card_and_their_tensors(tmp_path):
    _, _, slim = masked_and_sliced(5, 0.6)
    slim.eval()
    save_atomically(slim, ModelCard.generic("slim", 1, 3), tmp_path / "slim")
    loaded = load_model(tmp_path / "slim.safetensors")
    assert loaded.sizes() == slim.sizes() and "blocks" in slim.sizes()
    assert loaded.card.architecture["sizes"]["blocks"][0]["scale"] == 0.25
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(logits(loaded, x), logits(slim, x))
    # Without a card the widths come from the tensors' shapes (the scale is the release's).
    state = {k: v.clone() for k, v in slim.state_dict().items()}
    assert load_model(state).sizes() == slim.sizes()


@pytest.mark.slow
def test_counted_flops_equal_torch_flop_counter_for_sliced_widths():
    _, selection, slim = masked_and_sliced(6, 0.4)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        slim.predict(torch.zeros(1, 1, 64, 64))
    assert counter.get_total_flops() == slim.reference_flops(64, 64)
    assert selection.cost.flops == slim.reference_flops(256, 256)  # the budget's input size


@pytest.mark.slow
def test_targets_are_met_or_refused_with_the_reachable_minimum():
    model = tiny(7)
    randomise(model.add_search_factors(ALL))
    factors = model.search_factors()
    selection = select(model, factors, Budget(max_params=0.9, max_flops=0.95))
    assert selection.params_fraction <= 0.9 and selection.flops_fraction <= 0.95
    assert selection.fractions["head_channels"] == selection.fractions["mlp_hidden"] < 1.0
    # Only the bottleneck is searched: the default floors leave more than half of it all.
    with pytest.raises(InputError, match=r"keeping only the per-layer floors leaves \d+\.\d %"):
        select(model, factors, Budget(max_params=0.5))


@pytest.mark.slow
def test_the_command_compresses_mobileutr_weights_end_to_end(tmp_path, capsys):
    from napari_apformer.compress import command

    base = tiny(8)
    save_weights(base, ModelCard.generic("base", 1, 3), tmp_path / "base")
    write_pngs(tmp_path / "data")
    parser = argparse.ArgumentParser(prog="apformer")
    command.add_parser(parser.add_subparsers())
    out = tmp_path / "out" / "slim"
    argv = ["compress", "--images", str(tmp_path / "data"), "--val-fraction", "0.34"]
    argv += ["--weights", str(tmp_path / "base.safetensors"), "-o", str(out)]
    argv += ["--budget", "0.7", "--search-steps", "2", "--batch-size", "2", "--no-progress"]
    argv += ["--no-base-validation", "--device", "cpu"]
    args = parser.parse_args(argv)
    args.command_line = argv
    assert args.run(args) == 0
    assert "kept per layer: head_channels" in capsys.readouterr().out
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["architecture"]["family"] == "mobileutr"
    blocks = card["architecture"]["sizes"]["blocks"]
    assert blocks[0]["dim_v"] == 16  # the LGL block's values are not searched
    assert all(b["mlp"] < full for b, full in zip(blocks, [256, 512, 512], strict=True))
    assert card["training"]["compression"]["fractions_asked"]["mlp_hidden"] == 0.7
    loaded = load_model(out.with_suffix(".safetensors"))
    assert loaded.family == "mobileutr" and loaded.sizes() == card["architecture"]["sizes"]
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in base.parameters())
    plain = argv[: argv.index("--budget")]
    for bad, message in [
        (["--target-params", "0.5"], "keeping only the per-layer floors leaves"),
        (["--lambda", "heads=1e-4"], "no searchable dimension heads"),
    ]:
        args = parser.parse_args([*plain, *bad])
        with pytest.raises(InputError, match=message):
            args.run(args)
