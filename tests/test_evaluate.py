"""`apformer evaluate`: Dice, HD95 and surface Dice against a case computed by hand, voxel
orders, geometry and shape mismatches, folders paired by name, and the CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_apformer.cli import main  # noqa: E402
from napari_apformer.evaluate import boundary_distances, evaluate_pair, score_class  # noqa: E402

SPACING = (2.0, 1.0, 1.0)  # x (RAS) is 2 mm, y and z 1 mm
AFFINE = np.diag([*SPACING, 1.0])
TABLE = {
    "labels": [
        {"value": 0, "name": "background", "colour": "#000000"},
        {"value": 1, "name": "tumour", "colour": "#ff0000"},
        {"value": 2, "name": "oedema", "colour": "#00ff00"},
    ]
}


def boxes(shift: int = 0) -> np.ndarray:
    """A 4 x 4 x 4 voxel box of class 1 at x, y, z in 2..5, moved by `shift` voxels along x."""
    labels = np.zeros((10, 9, 8), np.uint8)
    labels[2 + shift : 6 + shift, 2:6, 2:6] = 1
    return labels


def save(path, labels, affine=AFFINE, table=None):
    nib.save(nib.Nifti1Image(labels, affine), path)
    if table is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(table))
    return path


# The box moved by one voxel (2 mm) along x, worked out by hand:
# - overlap 3 x 4 x 4 = 48 voxels of 64 and 64: Dice = 2 * 48 / 128 = 0.75;
# - each box has 64 - 8 (its 2 x 2 x 2 interior) = 56 boundary voxels (a face neighbour
#   outside). Of the reference's: 36 are boundary voxels of the prediction too (distance 0);
#   4 lie in the prediction's interior (x = 5, y and z in 3..4), 1 mm (one voxel along y or z)
#   from its boundary; the 16 of the face x = 2 are 2 mm (one voxel along x) from the
#   prediction's face x = 3. The other way round is the mirror image;
# - HD95: the 95th percentile of 36 x 0, 4 x 1, 16 x 2 mm is 2 mm (both ways);
# - surface Dice at 1 mm: (36 + 4) * 2 of 112 boundary voxels = 5 / 7; at 0.5 mm: 72 / 112;
#   at 2 mm: 1;
# - volumes: 64 voxels of 2 mm^3 = 0.128 ml each.
HAND = {"dice": 0.75, "hd95": 2.0, 1.0: 5 / 7, 0.5: 72 / 112, 2.0: 1.0}


def test_the_hand_computed_case():
    reference, prediction = boxes() == 1, boxes(1) == 1
    to_prediction, to_reference = boundary_distances(reference, prediction, SPACING)
    for distances in (to_prediction, to_reference):
        assert len(distances) == 56
        assert sorted(np.round(distances, 6)) == [0.0] * 36 + [1.0] * 4 + [2.0] * 16
    for tolerance in (0.5, 1.0, 2.0):
        score = score_class(reference, prediction, SPACING, tolerance)
        assert score.dice == pytest.approx(HAND["dice"])
        assert score.hd95 == pytest.approx(HAND["hd95"])
        assert score.surface_dice == pytest.approx(HAND[tolerance])


@pytest.mark.parametrize("order", ["same", "flipped"])
def test_evaluate_files_with_class_names_from_the_sidecar(tmp_path, capsys, order):
    reference = save(tmp_path / "case1.nii.gz", boxes())
    labels, affine = boxes(1), AFFINE
    if order == "flipped":  # the same grid stored with x running the other way
        labels, affine = (
            labels[::-1],
            AFFINE
            @ nib.orientations.inv_ornt_aff(np.array([[0, -1], [1, 1], [2, 1]]), labels.shape),
        )
    prediction = save(tmp_path / "case1_seg.nii.gz", labels, affine, TABLE)
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "evaluate",
                str(prediction),
                "--reference",
                str(reference),
                "--tolerance",
                "1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "1 tumour" in printed and "0.7500" in printed and "2.00" in printed
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["value"], r["class"]) for r in rows] == [("1", "tumour"), ("2", "oedema")]
    tumour, oedema = rows
    assert float(tumour["dice"]) == pytest.approx(0.75)
    assert float(tumour["hd95_mm"]) == pytest.approx(2.0)
    assert float(tumour["surface_dice"]) == pytest.approx(5 / 7, abs=1e-6)
    assert float(tumour["reference_ml"]) == float(tumour["prediction_ml"]) == 0.128
    assert float(tumour["volume_difference_ml"]) == 0
    assert oedema["dice"] == oedema["hd95_mm"] == "" and oedema["reference_voxels"] == "0"


def test_a_class_missing_from_one_side(tmp_path):
    reference = boxes()
    reference[7:9, 6:8, 6:8] = 2
    save(tmp_path / "ref.nii.gz", reference)
    save(tmp_path / "pred.nii.gz", boxes())
    scores = {
        s.value: s for s in evaluate_pair(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz", 1.0)
    }
    assert scores[1].dice == 1.0 and scores[1].hd95 == 0.0 and scores[1].surface_dice == 1.0
    assert scores[2].dice == 0.0 and scores[2].hd95 == float("inf") and scores[2].surface_dice == 0
    assert scores[2].name == "class 2"


@pytest.mark.parametrize(
    "labels, affine, message",
    [
        (boxes()[:, :, :6], AFFINE, "shapes differ: prediction (10, 9, 6), reference (10, 9, 8)"),
        (boxes(), AFFINE, None),
        (
            boxes(),
            np.array([[2.0, 0, 0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
            "not on the same voxel grid: corresponding voxel centres are up to 1 mm apart",
        ),
    ],
    ids=["shape", "same grid", "shifted"],
)
def test_mismatches_are_one_line(tmp_path, capsys, labels, affine, message):
    save(tmp_path / "ref.nii.gz", boxes())
    save(tmp_path / "pred.nii.gz", labels, affine)
    code = main(["evaluate", str(tmp_path / "pred.nii.gz"), "-r", str(tmp_path / "ref.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:
        assert code == 0 and err == []
        return
    assert code == 1 and len(err) == 1
    assert err[0].startswith("apformer: error: ") and message in err[0]
    assert "pred.nii.gz against" in err[0]


def test_folders_are_paired_by_name(tmp_path, capsys):
    (tmp_path / "ref").mkdir(), (tmp_path / "pred").mkdir()
    save(tmp_path / "ref" / "case1.nii.gz", boxes())
    save(tmp_path / "ref" / "case3.nii.gz", boxes())
    save(tmp_path / "pred" / "case1_seg.nii.gz", boxes(1), table=TABLE)
    save(tmp_path / "pred" / "case2_seg.nii.gz", boxes(1))
    save(tmp_path / "pred" / "case1_prob.nii.gz", np.zeros((10, 9, 8, 2), np.float32))
    out = tmp_path / "scores.csv"
    args = ["evaluate", "-p", str(tmp_path / "pred"), "-r", str(tmp_path / "ref"), "-o", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "case2_seg.nii.gz: no reference of that name" in err
    assert "case3.nii.gz: no prediction of that name" in err
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["prediction"].split("/")[-1] for r in rows} == {"case1_seg.nii.gz"}


def test_bad_arguments(tmp_path, capsys):
    save(tmp_path / "ref.nii.gz", boxes())
    for args, message in [
        (["-r", str(tmp_path / "ref.nii.gz")], "give the prediction once"),
        ([str(tmp_path / "no.nii.gz"), "-r", str(tmp_path / "ref.nii.gz")], "not found"),
        ([str(tmp_path), "-r", str(tmp_path / "ref.nii.gz")], "two files or two folders"),
        (
            [str(tmp_path / "ref.nii.gz"), "-r", str(tmp_path / "ref.nii.gz"), "--tolerance", "-1"],
            "--tolerance takes a distance in mm",
        ),
    ]:
        assert main(["evaluate", *args]) == 1
        [line] = capsys.readouterr().err.strip().splitlines()
        assert message in line


@pytest.mark.slow
def test_without_simpleitk_evaluate_says_how_to_install_it(tmp_path):
    save(tmp_path / "ref.nii.gz", boxes())
    code = (
        "import sys\n"
        "sys.modules['SimpleITK'] = None\n"
        "from napari_apformer.cli import main\n"
        f"sys.exit(main(['evaluate', {str(tmp_path / 'ref.nii.gz')!r}, '-r', "
        f"{str(tmp_path / 'ref.nii.gz')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "apformer evaluate needs `pip install napari-apformer[radiology]`" in done.stderr
