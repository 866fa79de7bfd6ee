"""What kind of scan a file says it is (io.acquisition), and the warning when the weights were
made for another kind: from BIDS names and sidecars, NIfTI headers and DICOM tags."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from napari_apformer import cli
from napari_apformer.errors import InputError
from napari_apformer.io.acquisition import mismatch, of_file, of_image
from napari_apformer.io.dicom import read_dicom
from napari_apformer.model.card import ModelCard
from napari_apformer.weights import DEFAULT_WEIGHTS, shipped_weights
from test_radiology_io import make_series

T1_MR = {"modality": "MR", "contrasts": ["T1w"]}
NIBABEL = Path(data_path)


def kind(path: Path) -> tuple[str, str] | None:
    found = of_file(path)
    return None if found is None else (found.modality, found.contrast)


def test_nifti_time_series_are_epi_and_a_t1_volume_says_nothing():
    """nibabel's two EPI test files (4D, seconds, a repetition time) and its real T1 scan:
    the pair that intensity statistics could not tell apart (docs/reliability.md)."""
    assert kind(NIBABEL / "example4d.nii.gz") == ("MR", "EPI")
    assert kind(NIBABEL / "functional.nii") == ("MR", "EPI")
    assert kind(NIBABEL / "anatomical.nii") is None
    warning = mismatch(of_file(NIBABEL / "functional.nii"), T1_MR)
    assert warning.startswith("this looks like an echo-planar EPI scan (its NIfTI header: 20")
    assert warning.endswith("made for T1w MR scans: expect wrong labels (see the weights' limits)")


def save_volume(path: Path, volumes: int = 1) -> Path:
    shape = (8, 8, 4) if volumes == 1 else (8, 8, 4, volumes)
    image = nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def test_bids_names_and_sidecars(tmp_path):
    assert kind(tmp_path / "sub-01_T1w.nii.gz") == ("MR", "T1w")
    assert kind(tmp_path / "sub-01_ses-1_T2w.nii.gz") == ("MR", "T2w")
    assert kind(tmp_path / "sub-01_task-rest_bold.nii.gz") == ("MR", "EPI")
    assert kind(tmp_path / "sub-01_dwi.nii") == ("MR", "EPI")
    assert kind(tmp_path / "head_ct.nrrd") == ("CT", "")
    assert kind(tmp_path / "brain.nii.gz") is None and kind(tmp_path / "T1w.nii.gz") is None
    assert mismatch(of_file(tmp_path / "sub-01_T1w.nii.gz"), T1_MR) is None
    assert "a T2w MR scan (the BIDS name suffix _T2w)" in mismatch(
        of_file(tmp_path / "sub-01_T2w.nii.gz"), T1_MR
    )
    # A sidecar beside the file speaks first: its statement, then the name's.
    scan = save_volume(tmp_path / "sub-02_T1w.nii.gz")
    sidecar = tmp_path / "sub-02_T1w.json"
    sidecar.write_text(json.dumps({"ScanningSequence": ["GR", "IR"], "Modality": "MR"}))
    assert kind(scan) == ("MR", "T1w")
    sidecar.write_text(json.dumps({"ScanningSequence": "EP", "EchoTime": 0.03}))
    assert of_file(scan).evidence == "its sidecar sub-02_T1w.json: ScanningSequence EP"
    sidecar.write_text(json.dumps({"PulseSequenceType": "Gradient Echo EPI"}))
    assert kind(scan) == ("MR", "EPI")
    sidecar.write_text(json.dumps({"Modality": "CT"}))
    assert kind(scan) == ("CT", "")
    for bad in ("{not json", "[1, 2]", "\xff", "[" * 100_000):
        sidecar.write_bytes(bad.encode("latin-1"))
        assert kind(scan) == ("MR", "T1w")  # never an error: the name still speaks


def test_dicom_series_state_their_modality_and_echo_planar_sequence(tmp_path):
    make_series(tmp_path / "ct", modality="CT")
    make_series(tmp_path / "epi", modality="MR", scanning_sequence="EP", intercept=0.0)
    make_series(tmp_path / "t1", modality="MR", scanning_sequence="GR\\IR", intercept=0.0)
    ct, epi, t1 = (of_image(read_dicom(tmp_path / name)) for name in ("ct", "epi", "t1"))
    assert (ct.modality, ct.evidence) == ("CT", "DICOM Modality CT")
    assert (epi.contrast, epi.evidence) == ("EPI", "DICOM ScanningSequence EP")
    assert t1 is None and mismatch(ct, T1_MR).startswith("this looks like a CT scan")
    assert mismatch(ct, {}) is None  # weights that say nothing get no warning


def test_cards_record_what_the_weights_were_made_for(capsys):
    for path in shipped_weights().values():
        assert ModelCard.read(path.with_suffix(".json")).made_for == T1_MR
    card = json.loads(shipped_weights()[DEFAULT_WEIGHTS].with_suffix(".json").read_text())
    for bad in ({"modality": 1}, {"contrasts": "T1w"}, {"sequence": "EP"}, ["MR"]):
        with pytest.raises(InputError, match="made_for"):
            ModelCard.from_json(json.dumps({**card, "made_for": bad}), "card.json")
    assert cli.main(["info", DEFAULT_WEIGHTS]) == 0
    assert "made for: T1w MR scans (others get a warning)" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_warns_on_an_epi_and_not_on_a_t1(tmp_path, capsys):
    epi = shutil.copy(NIBABEL / "functional.nii", tmp_path / "functional.nii")
    t1 = shutil.copy(NIBABEL / "anatomical.nii", tmp_path / "anatomical.nii")
    assert cli.main(["predict", str(epi), "--volume", "0", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"apformer: warning: {epi}: volume 0: this looks like an echo-planar EPI scan" in err
    assert cli.main(["predict", str(t1), "-o", str(tmp_path / "out")]) == 0
    assert "this looks like" not in capsys.readouterr().err
