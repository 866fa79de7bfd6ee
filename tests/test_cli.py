"""The command line: outputs keep geometry, nothing is overwritten, errors are one line."""

import json
import shutil
import subprocess
import sys

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from conftest import SAMPLE
from napari_apformer.cli import main
from napari_apformer.weights import DEFAULT_WEIGHTS


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "brain.nii.gz"
    shutil.copy(SAMPLE, path)
    return path


def test_predict_nifti_keeps_affine_and_header(tmp_path, sample, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(sample), "-o", str(out), "--token-threshold", "0.8"]) == 0
    result = out / "brain_seg.nii.gz"
    source, labels = nib.load(sample), nib.load(result)
    assert np.array_equal(labels.affine, source.affine) and labels.shape == source.shape
    assert labels.get_data_dtype() == np.uint8
    assert labels.header.get_zooms() == source.header.get_zooms()
    table = json.loads((out / "brain_seg.json").read_text())
    assert [c["value"] for c in table["labels"]] == [0, 1, 2, 3]
    assert table["token_threshold"] == 0.8
    captured = capsys.readouterr()
    assert "kept tokens" in captured.out and "warning" not in captured.err


def test_placeholder_weights_are_announced(tmp_path, sample, capsys):
    from napari_apformer.model import APFormer, ModelCard, save_weights

    card = ModelCard.generic("random", 1, 2)
    card.placeholder = True
    save_weights(APFormer(1, 2), card, tmp_path / "random.safetensors")
    args = ["predict", str(sample), "-o", str(tmp_path / "o"), "--weights"]
    assert main([*args, str(tmp_path / "random.safetensors")]) == 0
    assert "placeholder" in capsys.readouterr().err


def test_existing_output_is_skipped_not_overwritten(tmp_path, sample, capsys):
    target = tmp_path / "mine.nii.gz"
    target.write_bytes(b"precious")
    assert main(["predict", str(sample), "-o", str(target)]) == 0
    assert target.read_bytes() == b"precious"
    assert "exists, skipped (--overwrite replaces it)" in capsys.readouterr().err
    assert main(["predict", str(sample), "-o", str(target), "--overwrite", "--axis", "2"]) == 0
    assert nib.load(target).shape == nib.load(sample).shape


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


def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "napari_apformer.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("napari-apformer ")


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
