"""The command line: outputs keep geometry, nothing is overwritten, errors are one line;
settings, sidecars and `apformer info` come from what the model family declares (a toy
family defined here runs through it with nothing else to change)."""

import json
import shutil
import subprocess
import sys
from typing import ClassVar

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SAMPLE
from napari_apformer.cli import build_parser, given_settings, join_negative_values, main
from napari_apformer.model import base
from napari_apformer.model.base import (
    CounterSpec,
    InputRule,
    MapSpec,
    Prediction,
    SegmentationModel,
    Setting,
)
from napari_apformer.weights import DEFAULT_WEIGHTS


class ToyNet(SegmentationModel):
    """A two-convolution network with two settings, one map and one counter."""

    family = "toy"
    variants: ClassVar = {"small": {"hidden": 4}}

    def __init__(self, in_channels=1, n_classes=2, variant="small", hidden=4):
        super().__init__(in_channels, n_classes, variant)
        self.hidden = hidden
        self.first = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.last = nn.Conv2d(hidden, n_classes, 1)

    @property
    def input_rule(self):
        return InputRule(multiple=4)

    def sizes(self):
        return {"hidden": self.hidden}

    @classmethod
    def from_sizes(cls, in_channels, n_classes, variant, sizes):
        return cls(in_channels, n_classes, variant, int(sizes["hidden"]))

    @classmethod
    def recognise(cls, state):
        if set(state) != {"first.weight", "first.bias", "last.weight", "last.bias"}:
            return None
        first = state["first.weight"]
        return {
            "in_channels": first.shape[1],
            "n_classes": state["last.weight"].shape[0],
            "variant": "small",
            "sizes": {"hidden": first.shape[0]},
        }

    def declared_settings(self):
        return [
            Setting("bias", "background bias", -5.0, 5.0, 0.0, "added to the background logit"),
            Setting("scale", "layer scale", 0.0, 2.0, 1.0, "multiplies a layer", per_layer=2),
        ]

    def map_specs(self):
        return [MapSpec("bright", "bright cells", 4, "fraction", "mean of each 4 x 4 cell")]

    def counter_specs(self):
        return [CounterSpec("bright_cells", "bright cells")]

    def predict(self, x, want_attention=False, **settings):
        values = self.resolve_settings(settings)
        hidden = torch.relu(self.first(x)) * values["scale"][0]
        shift = torch.zeros(self.n_classes, dtype=x.dtype, device=x.device)
        shift[0] = values["bias"]
        logits = self.last(hidden) * values["scale"][1] + shift[:, None, None]
        cells = F.avg_pool2d(x.mean(dim=1, keepdim=True), 4)[:, 0]
        bright = (cells > 0.5).flatten(1).sum(dim=1)
        height, width = x.shape[-2:]
        flops = 2 * height * width * self.hidden * (9 * self.in_channels + self.n_classes)
        return Prediction(
            logits=logits,
            maps={"bright": cells},
            counters={
                "bright_cells": torch.stack([bright, torch.full_like(bright, cells[0].numel())], 1)
            },
            flops=torch.full((x.shape[0],), flops, dtype=torch.int64),
        )


def save_toy_weights(folder, monkeypatch, n_classes=3):
    """Register the toy family for this test only and save weights of it."""
    from napari_apformer.model import ModelCard, save_weights

    monkeypatch.setitem(base._FAMILIES, ToyNet.family, ToyNet)
    torch.manual_seed(0)
    path = folder / "toy.safetensors"
    save_weights(ToyNet(1, n_classes), ModelCard.generic("toy", 1, n_classes), path)
    return path


def strict_json(path):
    """The JSON in `path`, failing on NaN or infinities (which JSON does not have)."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "brain.nii.gz"
    shutil.copy(SAMPLE, path)
    return path


@pytest.mark.slow
def test_predict_nifti_keeps_affine_and_header(tmp_path, sample, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(sample), "-o", str(out), "--token-threshold", "0.8"]) == 0
    result = out / "brain_seg.nii.gz"
    source, labels = nib.load(sample), nib.load(result)
    assert np.array_equal(labels.affine, source.affine) and labels.shape == source.shape
    assert labels.get_data_dtype() == np.uint8
    assert labels.header.get_zooms() == source.header.get_zooms()
    table = strict_json(out / "brain_seg.json")
    assert [c["value"] for c in table["labels"]] == [0, 1, 2, 3]
    assert table["settings"] == {"token_threshold": 0.8, "gate": [-2.0] * 4}
    assert table["family"] == "apformer"
    statistics = table["statistics"]
    assert set(statistics["counters"]) == {"kept_tokens", "kept_dependencies"}
    assert all(0 < f < 1 for f in statistics["counters"].values())
    assert 0 < statistics["gflops"] < statistics["gflops_unpruned"]
    captured = capsys.readouterr()
    assert "kept tokens" in captured.out and "warning" not in captured.err


@pytest.mark.slow
def test_set_takes_per_layer_negative_values_and_the_aliases(tmp_path, sample):
    out = tmp_path / "out"
    args = ["predict", str(sample), "-o", str(out), "--set", "gate=-2,-2,-1,0"]
    assert main([*args, "--token-threshold", "0.7"]) == 0
    table = strict_json(out / "brain_seg.json")
    assert table["settings"] == {"token_threshold": 0.7, "gate": [-2.0, -2.0, -1.0, 0.0]}


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--set", "gate=-2,-2,-1,0"], {"gate": ["-2", "-2", "-1", "0"]}),
        (["--gate", "-2,-2,-1,0"], {"gate": ["-2", "-2", "-1", "0"]}),
        (["--gate=-1.5"], {"gate": "-1.5"}),
        (["--gate", "-.5"], {"gate": "-.5"}),
        (["--token-threshold", "0.5"], {"token_threshold": "0.5"}),
        (
            ["--set", "token_threshold=1", "--set", "gate=0"],
            {"token_threshold": "1", "gate": "0"},
        ),
    ],
)
def test_set_and_alias_flags_name_the_same_settings(flags, expected):
    argv = join_negative_values(["predict", "in.nii.gz", "-o", "out", *flags])
    args = build_parser().parse_args(argv)
    assert {name: value for name, (_, value) in given_settings(args).items()} == expected


@pytest.mark.slow
def test_placeholder_weights_are_announced(tmp_path, sample, capsys):
    from napari_apformer.model import APFormer, ModelCard, save_weights

    card = ModelCard.generic("random", 1, 2)
    card.placeholder = True
    save_weights(APFormer(1, 2), card, tmp_path / "random.safetensors")
    args = ["predict", str(sample), "-o", str(tmp_path / "o"), "--weights"]
    assert main([*args, str(tmp_path / "random.safetensors")]) == 0
    assert "placeholder" in capsys.readouterr().err


@pytest.mark.slow
def test_existing_output_is_skipped_not_overwritten(tmp_path, sample, capsys):
    target = tmp_path / "mine.nii.gz"
    target.write_bytes(b"precious")
    assert main(["predict", str(sample), "-o", str(target)]) == 0
    assert target.read_bytes() == b"precious"
    assert "exists, skipped (--overwrite replaces it)" in capsys.readouterr().err
    assert main(["predict", str(sample), "-o", str(target), "--overwrite", "--axis", "2"]) == 0
    assert nib.load(target).shape == nib.load(sample).shape


@pytest.mark.slow
def test_folder_with_a_bad_file_reports_it_and_does_the_rest(tmp_path, sample, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sample, folder / "a.nii.gz")
    (folder / "b.png").write_text("not an image")
    iio.imwrite(
        folder / "c.png", (np.random.default_rng(0).random((40, 60)) * 255).astype(np.uint8)
    )
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert main(["predict", str(folder), "-o", str(out), "--batch-size", "1"]) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "a_seg.itksnap.txt",
        "a_seg.json",
        "a_seg.nii.gz",
        "apformer-stats.csv",
        "c_seg.json",
        "c_seg.png",
    ]
    assert iio.imread(out / "c_seg.png").shape == (40, 60)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "b.png" in errors[0] and "not a readable PNG" in errors[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "missing.nii.gz", "-o", "x"], "not found"),
        (["predict", "{sample}", "-o", "x", "--gate", "1,2"], "gate"),
        (["predict", "{sample}", "-o", "x", "--token-threshold", "2"], "token_threshold"),
        (["predict", "{sample}", "-o", "x", "--weights", "nope.pth"], "not found"),
        (["predict", "{sample}", "-o", "x", "--axis", "oblique"], "--axis"),
        (["predict", "{sample}", "-o", "x.png"], "NIfTI labels"),
        (
            ["predict", "{sample}", "-o", "x", "--set", "tau=0.5"],
            "--set tau: apformer weights have no setting 'tau'; their settings: "
            "token_threshold, gate",
        ),
        (
            ["predict", "{sample}", "-o", "x", "--set", "token_threshold=nan"],
            "token_threshold must be in (0, 1], got nan",
        ),
        (["predict", "{sample}", "-o", "x", "--set", "gate=-2,nan"], "gate must be in"),
        (["predict", "{sample}", "-o", "x", "--set", "gate=1e999"], "gate must be in"),
        (["predict", "{sample}", "-o", "x", "--set", "gate=-2,-2"], "expected 1 or 4 values"),
        (["predict", "{sample}", "-o", "x", "--set", "gate=low"], "expected a number"),
        (["predict", "{sample}", "-o", "x", "--set", "gate"], "--set takes NAME=VALUE"),
        (["predict", "{sample}", "-o", "x", "--set", "=1"], "--set takes NAME=VALUE"),
        (
            ["predict", "{sample}", "-o", "x", "--set", "gate=0", "--gate", "-1"],
            "setting gate is given twice (--set gate and --gate)",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path, sample, capsys, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    assert main([a.replace("{sample}", str(sample)) for a in args]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.png").exists()


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert DEFAULT_WEIGHTS in out and "devices: " in out
    assert "family: apformer (variant default)" in out
    sizes = "sizes: input_size 256; widths 16, 32, 64, 128; layers 4 x (heads 6, dim_head 128"
    assert sizes in out and "input: 256 x 256, 1 channel" in out
    assert "token_threshold: token threshold, one value, default 0.9, range (0, 1]" in out
    assert "gate: dependency gate, one per layer (4), default -2,-2,-2,-2, range [-10, 10]" in out
    assert "keep: kept tokens (mask, on 8 x 8 pixel cells)" in out
    assert "counters: kept_tokens (kept tokens), kept_dependencies (kept dependencies)" in out
    assert "capabilities: cached encode/decode split, attention of a query point" in out
    assert "classes: 0 background, 1 CSF, 2 grey matter, 3 white matter" in out
    assert "limits:\n    - T1-weighted brain MRI only" in out  # from the card
    assert "description: APFormer for brain tissue segmentation" in out


def test_a_family_defined_in_a_test_runs_through_the_command_line(
    tmp_path, sample, capsys, monkeypatch
):
    weights = save_toy_weights(tmp_path, monkeypatch)
    assert main(["info", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "family: toy (variant small)" in out and "sizes: hidden 4" in out
    assert "input: any multiple of 4, 1 channel" in out
    assert "bias: background bias, one value, default 0, range [-5, 5]" in out
    assert "scale: layer scale, one per layer (2), default 1,1, range [0, 2]" in out
    assert "bright: bright cells (fraction, on 4 x 4 pixel cells)" in out
    assert "counters: bright_cells (bright cells)" in out and "capabilities: none" in out

    out = tmp_path / "out"
    args = ["predict", str(sample), "-o", str(out), "--weights", str(weights)]
    assert main([*args, "--set", "bias=-1.5", "--set", "scale=0.5,1.5"]) == 0
    table = strict_json(out / "brain_seg.json")
    assert table["family"] == "toy"
    assert table["settings"] == {"bias": -1.5, "scale": [0.5, 1.5]}
    assert set(table["statistics"]["counters"]) == {"bright_cells"}
    assert nib.load(out / "brain_seg.nii.gz").shape == nib.load(sample).shape
    assert "bright cells" in capsys.readouterr().out

    assert main([*args, "--token-threshold", "0.5", "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "apformer: error: --token-threshold: toy weights have no setting 'token_threshold'; "
        "their settings: bias, scale"
    ]


@pytest.mark.slow
def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "napari_apformer.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("napari-apformer ")


@pytest.mark.slow
def test_unwritable_output_is_one_line(tmp_path, sample, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert main(["predict", str(sample), "-o", str(blocker / "sub")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(err) == 1 and "cannot write" in err[0] and "sub" in err[0]


def test_internal_errors_are_one_line_unless_debugging(sample, tmp_path, capsys, monkeypatch):
    import napari_apformer.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "predict_file", broken)
    assert main(["predict", str(sample), "-o", str(tmp_path / "o")]) == 2
    assert "internal error (RuntimeError: boom)" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        main(["--debug", "predict", str(sample), "-o", str(tmp_path / "o")])


@pytest.mark.slow
def test_a_closed_pipe_is_not_an_internal_error():
    """`apformer info | head -1`: the reader leaves early; no error line, no traceback."""
    import subprocess
    import sys

    code = "import sys; from napari_apformer.cli import main; sys.exit(main(['info']))"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # before anything is written: the first write meets a closed pipe
    _, errors = process.communicate(timeout=120)
    assert b"internal error" not in errors and b"Traceback" not in errors
