"""FLOPs from the kept tokens agree with torch's own count of what the model ran."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.engine.stats import RunStats
from napari_apformer.model.apformer.flops import decoder_flops, first_layer_flops, slice_flops
from napari_apformer.model.apformer.network import TOKENS


def measured_flops(model, keep: torch.Tensor) -> int:
    encoded = model.encode(torch.rand(1, 1, 256, 256))
    gates = model.gate_values(None, encoded.x4)
    with FlopCounterMode(display=False) as counter:
        out = model.trans4(encoded.x4, keep, gates)
        y = model.conv4(out.features)
        y = model.up2(y, encoded.skip_parts[0])
        y = model.up3(y, encoded.skip_parts[1])
        model.outc(model.up4(y, encoded.skip_parts[2]))
        model.encode(torch.rand(1, 1, 256, 256))
    return counter.get_total_flops()


@pytest.mark.parametrize("kept", [TOKENS, 517, 1, 0])
def test_counted_flops_equal_measured(random_model, kept):
    keep = torch.zeros(1, TOKENS, dtype=torch.bool)
    keep[0, torch.randperm(TOKENS)[:kept]] = True
    with torch.inference_mode():
        measured = measured_flops(random_model, keep)
    assert slice_flops(random_model, kept) == measured


def test_unpruned_flops_match_spec(official_model):
    assert slice_flops(official_model, TOKENS) / 1e9 == pytest.approx(21.4, abs=0.05)


def test_run_stats_fractions():
    stats = RunStats(
        slices=2,
        labels={"kept_tokens": "kept tokens", "kept_dependencies": "kept dependencies"},
        flops=10**9,
        flops_unpruned=4 * 10**9,
        seconds=0.5,
    )
    stats.add("kept_tokens", 1000, 1024)
    stats.add("kept_tokens", 24, 1024)
    stats.add("kept_dependencies", 30, 60)
    assert stats.counters == {"kept_tokens": [1024, 2048], "kept_dependencies": [30, 60]}
    assert stats.fraction("kept_tokens") == 0.5
    assert stats.fraction("kept_dependencies") == 0.5
    assert stats.fraction("not counted") == 0.0
    assert stats.ms_per_slice == 250
    assert stats.fractions_text() == "kept tokens 50.0 %, kept dependencies 50.0 %"
    assert stats.summary() == (
        "2 slice(s) on cpu: kept tokens 50.0 %, kept dependencies 50.0 %, 1.0 of 4.0 GFLOP, "
        "250 ms per slice"
    )
    assert RunStats(slices=1).summary() == "1 slice(s) on cpu: 0.0 of 0.0 GFLOP, 0 ms per slice"


@pytest.mark.parametrize("kept", [TOKENS, 300])
def test_counted_flops_with_cached_first_layer_equal_measured(official_model, kept):
    keep = torch.zeros(1, TOKENS, dtype=torch.bool)
    keep[0, :kept] = True
    with torch.inference_mode():
        encoded = official_model.encode(torch.rand(1, 1, 256, 256))
        with FlopCounterMode(display=False) as fill:
            official_model.add_first_layer(encoded, -2.0)
        gates = official_model.gate_values(-2.0, encoded.x4)
        with FlopCounterMode(display=False) as reuse:
            out = official_model.trans4(encoded.x4, keep, gates, first_layer=encoded.first_layer)
            y = official_model.conv4(out.features)
            for up, part in zip(
                (official_model.up2, official_model.up3, official_model.up4),
                encoded.skip_parts,
                strict=True,
            ):
                y = up(y, part)
            official_model.outc(y)
    assert out.first_layer_reused
    assert first_layer_flops(official_model) == fill.get_total_flops()
    assert decoder_flops(official_model, kept, first_layer_reused=True) == reuse.get_total_flops()
