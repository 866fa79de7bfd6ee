"""FLOPs from the kept tokens agree with torch's own count of what the model ran."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_apformer.engine.stats import NOT_COUNTED, RunStats
from napari_apformer.model import base
from napari_apformer.model.apformer.flops import decoder_flops, first_layer_flops, slice_flops
from napari_apformer.model.apformer.network import TOKENS
from napari_apformer.model.base import Prediction, build_model
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights
from test_families import ToyConvNet


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_run_without_counted_flops_is_unknown_not_zero():
    stats = RunStats(labels={})
    stats.add_flops(3 * 10**9, 4 * 10**9, 5 * 10**9)
    assert stats.gflops == 3.0 and stats.gflops_full == 4.0 and stats.flops_counted
    stats.add_flops(None, None, 5 * 10**9)  # a slice whose model counts no FLOPs
    stats.slices = 2
    assert stats.gflops is None and stats.gflops_full is None and not stats.flops_counted
    assert stats.gflops_unpruned == 10.0  # torch's count of a plain pass: always known
    assert stats.summary() == (
        f"2 slice(s) on cpu: {NOT_COUNTED} (unpruned: 10.0 GFLOP), 0 ms per slice"
    )


class UncountedToy(ToyConvNet):
    """The test's toy family, but its predictions report no FLOPs."""

    family = "toy-uncounted"

    def predict(self, x: torch.Tensor, want_attention: bool = False, **settings) -> Prediction:
        out = super().predict(x, want_attention, **settings)
        out.flops = None
        return out


@pytest.fixture
def uncounted_weights(monkeypatch, tmp_path) -> Path:
    monkeypatch.setitem(base._FAMILIES, UncountedToy.family, UncountedToy)
    torch.manual_seed(0)
    model = build_model(UncountedToy.family, 1, 3).eval()
    save_weights(model, ModelCard.generic("uncounted", 1, 3), tmp_path / "uncounted")
    return tmp_path / "uncounted.safetensors"


def test_flops_a_family_does_not_count_are_unknown_in_the_engine_and_the_cli(
    uncounted_weights, tmp_path, capsys
):
    from napari_apformer.cli import main
    from napari_apformer.cohort import StatisticsTable
    from napari_apformer.engine.inference import Segmenter

    segmenter = Segmenter(load_model(uncounted_weights), device="cpu")
    data = np.random.default_rng(0).random((3, 20, 24)).astype(np.float32)
    result = segmenter.segment(segmenter.prepare(data))
    stats = result.stats
    assert stats.slices == 3 and not stats.flops_counted and stats.gflops is None
    assert stats.flops_unpruned > 0  # counted by torch for the read-out's comparison
    assert "0.0 of" not in stats.summary() and NOT_COUNTED in stats.summary()

    nib.save(nib.Nifti1Image(data.T.copy(), np.eye(4)), tmp_path / "image.nii.gz")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "image.nii.gz"), "--weights", str(uncounted_weights)]
    assert main([*args, "-o", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert NOT_COUNTED in printed and " GFLOP," not in printed.split(NOT_COUNTED)[0]
    [sidecar] = [json.loads(p.read_text()) for p in out.glob("*.json")]
    statistics = sidecar["statistics"]
    assert statistics["gflops"] is None and statistics["gflops_unpruned"] > 0
    table = StatisticsTable(["background", "a", "b"])
    table.add(tmp_path / "image.nii.gz", out, "done", statistics=statistics)
    assert table.rows[0]["gflops"] == "" and table.rows[0]["gflops_unpruned"] > 0


def test_the_widget_readout_says_flops_were_not_counted():
    pytest.importorskip("napari")
    from napari_apformer.plugin.widget import cost_lines

    stats = RunStats(slices=2, flops_unpruned=6 * 10**9, seconds=0.2)
    stats.add_flops(None, None, 0)
    lines = cost_lines(stats)
    assert lines[0].startswith(f"this run: {NOT_COUNTED}, 200 ms on cpu")
    assert lines[1] == "a full pass, unpruned: 3.0 GFLOP"
