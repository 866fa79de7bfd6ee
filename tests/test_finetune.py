"""Fine-tuning on a few corrected slices (train.finetune, `apformer finetune`): a few steps on a
small synthetic scan for every family with training losses, the card, refusals of bad input
with nothing written, cancel and interruption (not for quality)."""

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_apformer import cli
from napari_apformer.model import load_model, save_weights
from napari_apformer.model.base import Trainable, build_model, families
from napari_apformer.model.card import ClassInfo, ModelCard
from napari_apformer.model.checkpoint import sha256_of
from napari_apformer.train.finetune import (
    FinetuneCancelled,
    FinetuneOptions,
    check_corrections,
    finetune,
)
from napari_apformer.train.finetune_command import parse_slices
from test_families import SMALL

SHAPE = (40, 44, 8)  # RAS: 40 x 44 axial slices (axis 2), 8 of them
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
CLASSES = ["background", "core", "rim"]


def trainable_families() -> list[str]:
    return sorted(name for name, cls in families().items() if issubclass(cls, Trainable))


def synthetic_labels(shape=SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    for z in range(shape[2]):
        labels[8 + z : 30, 10 : 34 - z, z] = 1
        labels[14:22, 16:24, z] = 2
    return labels


def synthetic_image(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (labels * 60 + rng.integers(0, 30, labels.shape)).astype(np.float32)


def tiny_model(family: str):
    torch.manual_seed(0)
    model = build_model(family, 1, len(CLASSES), sizes=SMALL[family]).eval()
    colours = ["#000000", "#e6194b", "#3cb44b"]
    model.card = ModelCard(
        f"tiny-{family}",
        1,
        [ClassInfo(k, n, c) for k, (n, c) in enumerate(zip(CLASSES, colours, strict=True))],
        licence="test weights",
        limits=["test scans only"],
        made_for={"modality": "MR", "contrasts": ["T1w"]},
    )
    return model


@pytest.fixture(params=trainable_families())
def family(request) -> str:
    return request.param


@pytest.fixture
def base_weights(tmp_path, family):
    model = tiny_model(family)
    path = tmp_path / "base" / f"tiny-{family}.safetensors"
    save_weights(model, model.card, path)
    return path


@pytest.fixture
def scan(tmp_path):
    """(image, labels) NIfTI files on one grid."""
    folder = tmp_path / "scan"
    folder.mkdir()
    labels = synthetic_labels()
    image_path, labels_path = folder / "scan.nii.gz", folder / "scan_seg.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_image(labels), AFFINE), image_path)
    nib.save(nib.Nifti1Image(labels, AFFINE), labels_path)
    return image_path, labels_path


def apformer_finetune(weights, image, labels, slices, out, *more) -> int:
    args = ["finetune", "--weights", weights, "--image", image, "--labels", labels]
    args += ["--slices", slices, "-o", out, "--steps", 2, "--batch-size", 2, "--threads", 1]
    return cli.main([*map(str, args), *map(str, more)])


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_finetune_writes_changed_weights_and_a_card_that_records_the_run(
    tmp_path, base_weights, scan, family, capsys
):
    image, labels = scan
    out = tmp_path / "out" / "adapted"
    assert apformer_finetune(base_weights, image, labels, "axial:1-5", out, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "held-out slice 3: mean Dice" in printed and "core: Dice" in printed
    tuned, base = load_model(out.with_suffix(".safetensors")), load_model(base_weights)
    assert tuned.family == family and tuned.card.class_names == CLASSES
    assert not torch.equal(parameters(tuned), parameters(base))
    card = json.loads(out.with_suffix(".json").read_text())
    record = card["training"]["finetune"]
    assert record["base_weights"] == f"tiny-{family}"
    assert record["base_sha256"] == sha256_of(base_weights)
    assert record["image"] == "scan.nii.gz" and record["image_sha256"] == sha256_of(image)
    assert record["labels"] == "scan_seg.nii.gz" and record["labels_sha256"] == sha256_of(labels)
    assert record["axis"] == 2 and record["axis_name"] == "axial"
    assert record["slices"] == [1, 2, 4, 5] and record["held_out_slice"] == 3
    assert record["steps"] == 2 and not record["stopped_by_time_limit"]
    assert record["seconds"] > 0 and card["training"]["wall_seconds"] >= record["seconds"]
    assert card["training"]["command"].startswith("apformer finetune --weights")
    metrics = card["metrics"]
    assert set(metrics["held_out_dice_before"]) <= {"core", "rim"}
    assert set(metrics["held_out_dice_after"]) == set(metrics["held_out_dice_before"])
    for key in ("before", "after"):
        assert 0 <= metrics[f"held_out_mean_foreground_dice_{key}"] <= 1
    assert card["licence"] == "test weights" and card["name"] == "adapted"
    assert card["limits"] == ["test scans only"] and card["made_for"]["contrasts"] == ["T1w"]
    assert card["architecture"]["family"] == family and not list(tmp_path.glob("out/.*"))

    # Never replaced without --overwrite; replaced whole with it
    before = sha256_of(out.with_suffix(".safetensors"))
    assert apformer_finetune(base_weights, image, labels, "axial:1-5", out, "--no-progress") == 1
    assert "adapted.safetensors exists; --overwrite replaces it" in capsys.readouterr().err
    assert sha256_of(out.with_suffix(".safetensors")) == before
    more = ["--no-progress", "--overwrite", "--seed", 1]
    assert apformer_finetune(base_weights, image, labels, "axial:1-5", out, *more) == 0
    assert sha256_of(out.with_suffix(".safetensors")) != before
    load_model(out.with_suffix(".safetensors"))  # card and weights match (SHA-256 checked)


def test_the_function_trains_a_copy_and_reports_each_step():
    model = tiny_model("mobileutr")
    labels = synthetic_labels()
    labels[..., 0] = 9  # not a trusted slice: ignored
    start = parameters(model).clone()
    seen = []
    options = FinetuneOptions(steps=3, batch_size=2)
    result = finetune(
        model,
        synthetic_image(labels),
        labels,
        2,
        [6, 2, 2],  # unsorted, one repeated: slices 2 and 6
        spacing=(1.0, 1.0, 2.0),
        options=options,
        progress=lambda step, loss: seen.append((step, loss)),
    )
    assert [step for step, _ in seen] == [1, 2, 3] and all(np.isfinite(v) for _, v in seen)
    assert torch.equal(parameters(model), start)  # the base model is left as it was
    assert not torch.equal(parameters(result.model), start)
    assert not result.model.training and result.model.card.name == "tiny-mobileutr-finetuned"
    report = result.report
    assert report.trained_slices == [2, 6] and report.held_out_slice is None  # 2 < 3 slices
    assert report.dice_before is None and report.steps == 3 and report.final_loss == seen[-1][1]
    assert result.model.card.metrics == {}


def test_a_time_limit_stops_early_and_keeps_the_result():
    model = tiny_model("mobileutr")
    labels = synthetic_labels()
    options = FinetuneOptions(steps=50, batch_size=2, max_minutes=1e-9)
    result = finetune(model, synthetic_image(labels), labels, 2, [1, 3, 5], options=options)
    report = result.report
    assert report.steps == 1 and report.stopped_by_time_limit
    assert report.held_out_slice == 3 and report.dice_after is not None


def test_cancel_raises_before_the_next_step_and_changes_nothing():
    model = tiny_model("mobileutr")
    labels = synthetic_labels()
    start = parameters(model).clone()
    steps = []
    with pytest.raises(FinetuneCancelled):
        finetune(
            model,
            synthetic_image(labels),
            labels,
            2,
            [1, 3, 5],
            options=FinetuneOptions(steps=10, batch_size=2),
            progress=lambda step, loss: steps.append(step),
            cancel=lambda: len(steps) >= 2,
        )
    assert steps == [1, 2] and torch.equal(parameters(model), start)


def test_an_interrupted_run_writes_nothing(tmp_path, base_weights, scan, monkeypatch, capsys):
    from napari_apformer.train import finetune_command

    def interrupt(self, step, loss):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_command._Bar, "__call__", interrupt)
    out = tmp_path / "out" / "adapted"
    assert apformer_finetune(base_weights, *scan, "axial:1-5", out) == 130
    assert "during fine-tuning; nothing was written" in capsys.readouterr().err
    assert not out.parent.exists() or not list(out.parent.iterdir())


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


BAD_INPUT = {
    "shape": ("labels of shape (40, 44, 7) do not match the image scan.nii.gz", "axial:1,2"),
    "geometry": ("the labels' geometry (voxel-to-scanner affine) differs", "axial:1,2"),
    "no geometry": ("the image carries scanner geometry and the labels do not", "0:0"),
    "outside": (
        "slice(s) 8, 12 outside the volume: it has slices 0..7 along axis 2",
        "axial:1,8,12",
    ),
    "unknown class": ("hold label(s) 7, which the weights do not have (classes 0..2", "axial:1,2"),
    "no slice": ("no corrected slice given", "axial:"),
    "one class": ("hold only class 0 (background): label at least 2 classes", "axial:1,2"),
    "not whole": ("slice 2 holds values that are not whole numbers", "axial:1,2"),
    "bad slices": ("--slices takes AXIS:I,J,... with whole slice numbers", "axial:a,b"),
    "no axis": ("--slices: give the axis of the slices, e.g. axial:1,2", "1,2"),
}


@pytest.mark.parametrize("problem", list(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(
    tmp_path, scan, problem, capsys
):
    base = tmp_path / "base" / "tiny"
    model = tiny_model("mobileutr")
    save_weights(model, model.card, base.with_suffix(".safetensors"))
    image, labels = scan
    message, slices = BAD_INPUT[problem]
    good = synthetic_labels()
    if problem == "shape":
        labels = save(tmp_path / "bad.nii.gz", good[..., :7])
    elif problem == "geometry":
        labels = save(tmp_path / "bad.nii.gz", good, np.diag([1.0, 1.0, 3.0, 1.0]))
    elif problem == "no geometry":
        import tifffile

        labels = tmp_path / "bad.tif"
        tifffile.imwrite(labels, good)
    elif problem == "unknown class":
        good[5, 5, 2] = 7
        labels = save(tmp_path / "bad.nii.gz", good)
    elif problem == "one class":
        good[..., 1:3] = 0
        labels = save(tmp_path / "bad.nii.gz", good)
    elif problem == "not whole":
        bad = good.astype(np.float32)
        bad[5, 5, 2] = 0.5
        labels = save(tmp_path / "bad.nii.gz", bad)
    out = tmp_path / "out" / "adapted"
    code = apformer_finetune(base.with_suffix(".safetensors"), image, labels, slices, out)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err, err
    if problem != "bad slices":
        assert f"{image if problem == 'no axis' else labels}: " in err
    assert not out.parent.exists()


def test_parse_slices_takes_lists_and_ranges():
    assert parse_slices("axial:40,52,60-63") == ("axial", [40, 52, 60, 61, 62, 63])
    assert parse_slices("2: 1, 3") == ("2", [1, 3])
    assert parse_slices("5") == (None, [5])


def test_labels_outside_the_trusted_slices_are_not_checked():
    labels = synthetic_labels()
    labels[..., 4] = 200
    card = tiny_model("mobileutr").card
    chosen, truths = check_corrections(labels, SHAPE, 2, [3, 1], card)
    assert chosen == [1, 3] and [t.shape for t in truths] == [(40, 44)] * 2
    with pytest.raises(ValueError, match="label\\(s\\) 200"):
        check_corrections(labels, SHAPE, 2, [4], card)


@pytest.mark.slow
def test_the_widget_and_the_command_line_fine_tune_alike(tmp_path, base_weights, scan, family):
    """Issue 17: "the same code serves the widget". The widget's worker function (run_adapt),
    fed the layers napari's reader makes of the files, and `apformer finetune` on the files,
    with the same seed, steps and batch size, give the same weights and held-out Dice."""
    pytest.importorskip("napari")
    import queue
    import threading

    from napari.layers import Image

    from napari_apformer.plugin import adapt
    from napari_apformer.plugin._reader import read_layers
    from napari_apformer.plugin.image_source import image_source
    from napari_apformer.weights import user_weights_dir

    image_path, labels_path = scan
    out = tmp_path / "cli" / "adapted"
    more = ["--no-progress", "--device", "cpu", "--batch-size", 4, "--seed", 0]
    assert apformer_finetune(base_weights, image_path, labels_path, "axial:1-5", out, *more) == 0

    [(data, kwargs, kind)] = read_layers(str(image_path))
    [(label_data, _, label_kind)] = read_layers(str(labels_path))
    assert (kind, label_kind) == ("image", "labels")
    source = image_source(Image(data, **kwargs))
    assert source.transposed  # napari shows (S, A, R): axial is the shown axis 0
    job = adapt.AdaptJob(
        weights=base_weights,
        base_name=base_weights.stem,
        image=source,
        labels=np.array(label_data, copy=True),
        labels_name="scan_seg",
        axis=0,
        axis_name="axial",
        slices=(1, 2, 3, 4, 5),
        steps=2,  # apformer_finetune's --steps
        device="cpu",
        out=adapt.new_weights_path(base_weights.stem, source.name),
    )
    assert job.out.parent == user_weights_dir()  # the test's own folder (conftest)
    outcome = adapt.run_adapt(job, queue.SimpleQueue(), threading.Event())
    assert isinstance(outcome, adapt.AdaptOutcome), outcome

    cli_model, widget_model = load_model(out.with_suffix(".safetensors")), load_model(job.out)
    cli_state, widget_state = cli_model.state_dict(), widget_model.state_dict()
    assert cli_state.keys() == widget_state.keys()
    base = load_model(base_weights).state_dict()
    # Two steps at the default learning rate move the weights by about 1e-4: compare the
    # updates, to a hundredth of the largest (the same process computes both, so float
    # noise is far below that; any difference of data, seed or options is not).
    cli_update = {k: (v.double() - base[k].double()) for k, v in cli_state.items()}
    largest = max(float(u.abs().max()) for u in cli_update.values())
    assert largest > 0  # both trained
    for key, update in cli_update.items():
        widget_update = widget_state[key].double() - base[key].double()
        torch.testing.assert_close(widget_update, update, rtol=0, atol=largest / 100, msg=key)

    cli_card = json.loads(out.with_suffix(".json").read_text())
    widget_card = json.loads(job.out.with_suffix(".json").read_text())
    cli_run, widget_run = cli_card["training"]["finetune"], widget_card["training"]["finetune"]
    for key in ("slices", "held_out_slice", "axis", "steps"):
        assert widget_run[key] == cli_run[key], key
    for key in ("held_out_mean_foreground_dice_before", "held_out_mean_foreground_dice_after"):
        assert widget_card["metrics"][key] == pytest.approx(cli_card["metrics"][key], abs=1e-3)


def test_each_test_has_its_own_empty_user_folders(tmp_path_factory):
    """conftest points the user weights and settings folders into pytest's temporary folder,
    so fine-tuning in a test never reads or writes the user's own."""
    from napari_apformer.weights import user_weights, user_weights_dir

    temporary = tmp_path_factory.getbasetemp()
    assert user_weights_dir().is_relative_to(temporary) and user_weights() == {}
    napari_settings = Path(os.environ["NAPARI_CONFIG"]).parent
    assert napari_settings.is_relative_to(tempfile.gettempdir())
