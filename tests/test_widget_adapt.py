"""The widget's "Adapt to this scan" section in a real napari viewer (needs an X server:
xvfb-run): edited slices are tracked, fine-tuning saves, selects and undoes, Cancel and bad
input write nothing."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_apformer.plugin import adapt as adapt_module  # noqa: E402
from napari_apformer.plugin import widget as widget_module  # noqa: E402
from napari_apformer.weights import (  # noqa: E402
    USER_SUFFIX,
    USER_WEIGHTS_ENV,
    available_weights,
    resolve_weights,
    shipped_weights,
    shown_path,
)
from widget_helpers import PLUGIN, TIMEOUT_MS, open_widget, output, wait_idle  # noqa: E402

SAMPLE = Path(widget_module.__file__).parents[1] / "samples/mni152_t1_2mm.nii.gz"
EDITED = (1, 3, 5)


@pytest.fixture(autouse=True)
def two_slices_a_step(monkeypatch) -> None:
    """Fine-tuning steps of 2 slices instead of 4: these tests check the section's flow
    (save, select, go back, cancel), not the training, and a full-size APFormer step of 4
    slices was the suite's memory peak (about 1.7 GB above the viewer)."""
    from functools import partial

    from napari_apformer.train import finetune

    monkeypatch.setattr(
        finetune, "FinetuneOptions", partial(finetune.FinetuneOptions, batch_size=2)
    )


@pytest.fixture
def mine(tmp_path, monkeypatch) -> Path:
    """The user weights folder, in the test's own folder (not created yet)."""
    folder = tmp_path / "my-weights"
    monkeypatch.setenv(USER_WEIGHTS_ENV, str(folder))
    return folder


@pytest.fixture
def shown(monkeypatch) -> list[str]:
    """Every notification of the widget and of its adapt section."""
    messages: list[str] = []
    for module in (widget_module, adapt_module):
        for name in ("show_error", "show_info", "show_warning"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, messages.append)
    return messages


def small_scan(tmp_path: Path) -> Path:
    """Six axial slices of the 2 mm sample brain."""
    path = tmp_path / "scan.nii.gz"
    source = nib.load(SAMPLE)
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, 30:36], source.affine), path)
    return path


def open_scan(viewer, qtbot, tmp_path, weights):
    [image] = viewer.open(small_scan(tmp_path), plugin=PLUGIN)
    viewer.dims.set_point(0, image.translate[0] + 3 * image.scale[0])  # axial slice 3
    widget = open_widget(viewer, qtbot, weights)
    widget.adapt.toggle.value = True
    return image, widget


def correct(seg, slices=EDITED) -> None:
    """What a user does with the brush: two classes painted on each slice."""
    seg.brush_size = 16
    for s in slices:
        seg.data[s] = 0  # the brush then changes pixels of both classes for sure
        seg.paint((s, 40, 30), 1)
        seg.paint((s, 70, 60), 2)


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_slice_lists_and_history_atoms():
    parse, text = adapt_module.parse_slice_list, adapt_module.format_slice_list
    assert parse(" 5, 1 3-4,,4 ") == [1, 3, 4, 5]
    assert text([1, 3, 4, 5, 9]) == "1, 3-5, 9"
    assert text(parse("")) == ""
    with pytest.raises(adapt_module.InputError, match="not a slice number"):
        parse("3, x")
    masked = SimpleNamespace(slice_key=(slice(4, 5), slice(0, 9), slice(2, 7)))
    assert adapt_module.atom_slices(masked, 0, (8, 10, 10)) == {4}
    assert adapt_module.atom_slices(masked, 2, (8, 10, 10)) == {2, 3, 4, 5, 6}
    setitem = ((np.array([2, 2, 6]), np.array([1, 2, 3]), np.array([0, 0, 0])), None, 1)
    assert adapt_module.atom_slices(setitem, 0, (8, 10, 10)) == {2, 6}
    assert adapt_module.atom_slices(masked, 0, (10, 10)) == {0}


def test_user_weights_are_listed_and_resolved(mine):
    assert available_weights() == shipped_weights()  # no folder yet
    mine.mkdir()
    shipped = next(iter(shipped_weights()))
    for stem in ("scan-adapted", shipped, ".scan-adapted.previous-12"):
        for suffix in (".safetensors", ".json"):
            (mine / f"{stem}{suffix}").write_text("x")
    (mine / "no-card.safetensors").write_text("x")
    names = available_weights()
    assert names["scan-adapted"] == mine / "scan-adapted.safetensors"
    assert names[f"{shipped}{USER_SUFFIX}"] == mine / f"{shipped}.safetensors"
    assert names[shipped] == shipped_weights()[shipped]
    assert len(names) == len(shipped_weights()) + 2
    assert resolve_weights("scan-adapted") == mine / "scan-adapted.safetensors"
    assert resolve_weights(shipped) == shipped_weights()[shipped]


def test_finetune_on_corrected_slices_saves_selects_and_goes_back(
    viewer, qtbot, tmp_path, small_apformer_weights, mine, shown
):
    image, widget = open_scan(viewer, qtbot, tmp_path, small_apformer_weights)
    panel = widget.adapt
    seg = output(viewer, image, "segmentation")
    assert panel.slices.value == ""
    correct(seg)
    assert panel.slices.value == "1, 3, 5"
    corrected = {s: seg.data[s].copy() for s in EDITED}
    panel.steps.value = 2
    panel.start_button.clicked.emit()
    assert widget.busy and panel.cancel.enabled and not panel.start_button.enabled
    wait_idle(qtbot, widget)

    saved = [Path(mine, f) for f in files_in(mine)]
    assert [p.suffix for p in saved] == [".json", ".safetensors"]
    weights = saved[1]
    assert widget.weights_choice.value == weights.stem
    assert widget.weights_path() == weights
    assert widget._last.request.settings.weights == weights  # the slice ran again
    status = panel.status.value
    assert "Held-out slice 3: mean Dice" in status and "&rarr;" in status
    assert "trained on slices 1, 5" in status and weights.stem in status
    assert f"in {shown_path(mine)} and selected" in status
    card = json.loads(weights.with_suffix(".json").read_text())
    record = card["training"]["finetune"]
    assert record["slices"] == [1, 5] and record["held_out_slice"] == 3
    assert record["steps"] == 2 and record["image"] == image.name
    assert record["base_weights"] == small_apformer_weights.stem
    assert "held_out_mean_foreground_dice_after" in card["metrics"]
    for s in EDITED:  # the rerun kept the corrections
        assert np.array_equal(seg.data[s], corrected[s])
    assert any("saved and selected" in m for m in shown)
    assert not [m for m in shown if "error" in m.lower()]
    # Later sessions list them (the list is read from the folder).
    assert weights.stem in available_weights()
    widget.weights_choice.reset_choices()
    assert weights.stem in widget.weights_choice.choices

    assert panel.undo.enabled
    panel.undo.clicked.emit()
    wait_idle(qtbot, widget)
    assert widget.weights_choice.value == widget_module.OTHER_WEIGHTS
    assert Path(widget.weights_file.value) == small_apformer_weights
    assert widget._last.request.settings.weights == small_apformer_weights
    assert not panel.undo.enabled


def test_cancel_writes_nothing_and_keeps_the_weights(
    viewer, qtbot, tmp_path, small_apformer_weights, mine, shown
):
    image, widget = open_scan(viewer, qtbot, tmp_path, small_apformer_weights)
    panel = widget.adapt
    correct(output(viewer, image, "segmentation"))
    panel.steps.value = 500
    panel.start_button.clicked.emit()
    qtbot.waitUntil(lambda: "loss" in panel.status.value, timeout=TIMEOUT_MS)
    panel.cancel.clicked.emit()
    wait_idle(qtbot, widget)
    assert files_in(mine) == []
    assert "Cancelled" in panel.status.value and any("cancelled" in m for m in shown)
    assert widget.weights_choice.value == widget_module.OTHER_WEIGHTS
    assert widget.weights_path() == small_apformer_weights
    assert panel.start_button.enabled and not panel.cancel.enabled and not panel.undo.enabled


def test_bad_input_is_a_message_and_writes_nothing(
    viewer, qtbot, tmp_path, small_apformer_weights, mine, shown
):
    image, widget = open_scan(viewer, qtbot, tmp_path, small_apformer_weights)
    panel = widget.adapt
    panel.steps.value = 2
    panel.start_button.clicked.emit()  # nothing edited
    wait_idle(qtbot, widget)
    assert "no corrected slice given" in panel.status.value
    assert any(m.startswith("APFormer: no corrected slice given") for m in shown)
    seg = output(viewer, image, "segmentation")
    seg.data[0] = 0
    panel.slices.value = "0"  # typed: a slice that holds background only
    panel.start_button.clicked.emit()
    wait_idle(qtbot, widget)
    assert "label at least 2 classes" in panel.status.value
    panel.slices.value = "3, 9"
    panel.start_button.clicked.emit()
    wait_idle(qtbot, widget)
    assert "outside the volume" in panel.status.value
    panel.slices.value = "3, x"
    panel.start_button.clicked.emit()
    assert "not a slice number" in panel.status.value and not widget.busy
    assert not [m for m in shown if "unexpected" in m or "Traceback" in m]
    assert files_in(mine) == []
    assert widget.weights_path() == small_apformer_weights


def test_closing_the_viewer_while_fine_tuning(
    make_napari_viewer, qtbot, tmp_path, small_apformer_weights, mine
):
    viewer = make_napari_viewer()
    image, widget = open_scan(viewer, qtbot, tmp_path, small_apformer_weights)
    panel = widget.adapt
    correct(output(viewer, image, "segmentation"))
    panel.steps.value = 500
    panel.start_button.clicked.emit()
    qtbot.waitUntil(lambda: panel._done > 0, timeout=TIMEOUT_MS)
    viewer.close()
    qtbot.waitUntil(lambda: panel._worker is None, timeout=TIMEOUT_MS)
    assert widget._closed and panel._stop.is_set()
    assert files_in(mine) == []


def test_paths_under_the_home_folder_are_shown_from_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert shown_path(tmp_path / "a" / "weights") == str(Path("~/a/weights"))
    assert shown_path(Path("/elsewhere/weights")) == "/elsewhere/weights"
