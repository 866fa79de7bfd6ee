"""The "Evaluate against a reference" panel in a real napari viewer (needs an X server:
xvfb-run): the hand-computed case, the same numbers as `apformer evaluate` on one pair of
files, class names from the layers, the CSV, and layers that cannot be compared."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("SimpleITK")
pytestmark = pytest.mark.gui

from napari_apformer.cli import main  # noqa: E402
from napari_apformer.plugin import evaluate_panel as panel_module  # noqa: E402
from test_evaluate import HAND, TABLE, boxes, save  # noqa: E402
from widget_helpers import PLUGIN, TIMEOUT_MS  # noqa: E402

PANEL = "Evaluate against a reference"
MEASURES = ("dice", "hd95_mm", "surface_dice", "reference_ml", "prediction_ml")


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    shown: list[str] = []
    monkeypatch.setattr(panel_module, "show_error", shown.append)
    monkeypatch.setattr(panel_module, "show_info", lambda message: None)
    return shown


def open_panel(viewer):
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, PANEL)
    return panel


def run(panel, qtbot) -> None:
    panel.evaluate_button.clicked.emit()
    qtbot.waitUntil(lambda: not panel.busy, timeout=TIMEOUT_MS)  # the worker has finished


def two_class_pair(tmp_path):
    """A reference with two classes and a prediction that differs from it, on an LAS grid of
    2 x 1 x 1.5 mm voxels (napari shows it transposed), class names beside the reference."""
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:14, :16, :12]
    reference = np.zeros((14, 16, 12), np.uint8)
    reference[(z - 7) ** 2 / 25 + (y - 8) ** 2 / 36 + (x - 6) ** 2 / 16 < 1] = 1
    reference[(z - 6) ** 2 / 4 + (y - 7) ** 2 / 9 + (x - 5) ** 2 / 4 < 1] = 2
    prediction = np.roll(reference, 1, axis=1)
    flip = rng.random(reference.shape) < 0.03
    prediction[flip] = rng.integers(0, 3, int(flip.sum()))
    affine = np.diag([-2.0, 1.0, 1.5, 1.0])
    affine[:3, 3] = (40.0, -12.0, 7.0)
    ref_path = save(tmp_path / "case_label.nii.gz", reference, affine, TABLE)
    pred_path = save(tmp_path / "case_seg.nii.gz", prediction, affine)
    return ref_path, pred_path


def test_the_hand_computed_case(viewer, qtbot, errors):
    """The box moved by one voxel of 2 mm (test_evaluate.py works it out by hand), shown as
    napari shows a NIfTI volume: axes reversed, scale (1, 1, 2)."""
    reference, prediction = boxes().T, boxes(1).T
    placement = {"scale": (1.0, 1.0, 2.0), "units": ("mm",) * 3}
    viewer.add_labels(reference, name="reference", **placement)
    viewer.add_labels(prediction, name="brain segmentation", **placement)
    panel = open_panel(viewer)
    assert panel.prediction.value.name == "brain segmentation"  # chosen by their names
    assert panel.reference.value.name == "reference"
    panel.tolerance.value = 1.0
    run(panel, qtbot)
    assert not errors
    [row] = panel.rows
    assert row["dice"] == pytest.approx(HAND["dice"])
    assert row["hd95_mm"] == pytest.approx(HAND["hd95"])
    assert row["surface_dice"] == pytest.approx(HAND[1.0])
    assert row["volume_difference_ml"] == pytest.approx(0.0)
    assert row["reference_ml"] == pytest.approx(64 * 2 / 1000)
    table = panel.table.value
    assert table["columns"] == ("Dice", "volume difference (ml)", "HD95 (mm)", "surface Dice")
    assert table["index"] == ("1 class 1",)
    assert table["data"] == [["0.7500", "+0.000", "2.00", "0.7143"]]


def test_the_panel_and_apformer_evaluate_agree(viewer, qtbot, errors, tmp_path):
    ref_path, pred_path = two_class_pair(tmp_path)
    cli_csv = tmp_path / "cli.csv"
    code = main(
        ["evaluate", str(pred_path), "-r", str(ref_path), "--tolerance", "1.5", "-o", str(cli_csv)]
    )
    assert code == 0
    with cli_csv.open() as f:
        expected = list(csv.DictReader(f))
    assert [r["class"] for r in expected] == ["tumour", "oedema"]

    [reference] = viewer.open(ref_path, plugin=PLUGIN)
    [prediction] = viewer.open(pred_path, plugin=PLUGIN)
    panel = open_panel(viewer)
    panel.prediction.value, panel.reference.value = prediction, reference
    panel.tolerance.value = 1.5
    run(panel, qtbot)
    assert not errors
    panel_csv = panel.save_csv(tmp_path / "panel")
    assert panel_csv == tmp_path / "panel.csv"
    with panel_csv.open() as f:
        got = list(csv.DictReader(f))
    assert [r["class"] for r in got] == ["tumour", "oedema"]  # the reference layer's names
    assert [r["reference"] for r in got] == [reference.name] * 2
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["value"] == theirs["value"]
        for key in MEASURES:
            assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-6, abs=1e-9)
        assert float(mine["dice"]) < 1.0  # the two differ: not a trivial agreement
    table = panel.table.value
    assert table["index"] == ("1 tumour", "2 oedema")

    # "Save CSV..." without .csv: an existing panel.csv is not replaced unasked
    assert panel.save_csv(tmp_path / "panel") is None
    assert "already exists" in errors[-1]


def test_layers_that_cannot_be_compared_get_one_message(viewer, qtbot, errors):
    viewer.add_labels(np.zeros((4, 6, 5), np.uint8), name="a segmentation")
    viewer.add_labels(np.zeros((4, 6, 6), np.uint8), name="b reference")
    panel = open_panel(viewer)
    panel.evaluate()
    assert not panel.busy  # nothing started
    assert len(errors) == 1 and "differ in shape" in errors[0]
    assert "(4, 6, 5)" in errors[0] and "(4, 6, 6)" in errors[0]
    assert "a segmentation" in errors[0] and "b reference" in errors[0]

    viewer.layers["b reference"].data = np.zeros((4, 6, 5), np.uint8)
    viewer.layers["b reference"].scale = (1.0, 1.0, 2.0)
    panel.evaluate()
    assert "not on one grid" in errors[-1]
    assert panel.save_csv(panel_module.Path("never.csv")) is None  # nothing evaluated yet
    assert "evaluate first" in errors[-1]


def test_layers_in_pixels_have_no_volumes(viewer, qtbot, errors):
    labels = np.zeros((20, 24), np.uint8)
    labels[5:12, 6:15] = 1
    viewer.add_labels(labels, name="reference")
    viewer.add_labels(np.roll(labels, 2, axis=0), name="segmentation")
    panel = open_panel(viewer)
    run(panel, qtbot)
    assert not errors
    [row] = panel.rows
    assert row["volume_difference_ml"] == "" and row["dice"] == pytest.approx(2 * 45 / 126)
    assert panel.table.value["columns"][2] == "HD95 (pixel)"
    assert panel.table.value["data"][0][1] == "-"  # no volume difference
    assert "volumes not known" in panel.status.value
