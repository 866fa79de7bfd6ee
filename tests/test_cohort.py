"""Cohort runs: shards, resuming, a bad file among good ones, the statistics CSV (its
columns from the counters the model declares)."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SAMPLE
from napari_apformer.cli import main
from napari_apformer.cohort import parse_shard, take_shard
from test_cli import save_toy_weights, strict_json

CLASS_COLUMNS = [
    f"{name} ({unit})"
    for name in ("background", "CSF", "grey matter", "white matter")
    for unit in ("ml", "voxels")
]


@pytest.fixture
def cohort(tmp_path):
    """Five small volumes (the sample slice, stacked and cropped) and one corrupt file."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    source = nib.load(SAMPLE)
    data = np.asarray(source.dataobj)
    for k in range(5):
        volume = np.repeat(data[20 + 4 * k : 150 + 4 * k, 30:190], 2, axis=2)
        nib.save(nib.Nifti1Image(volume, source.affine, source.header), folder / f"s{k}.nii.gz")
    (folder / "s5.nii.gz").write_bytes(b"\x1f\x8b truncated")
    return folder


def read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_cohort_run_writes_statistics_and_reports_the_bad_file(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(cohort), "-o", str(out)]) == 1
    rows = read_rows(out / "apformer-stats.csv")
    assert list(rows[0]) == [
        "input",
        "output",
        "status",
        "message",
        "slices",
        "kept_tokens_percent",
        "kept_dependencies_percent",
        "gflops",
        "gflops_unpruned",
        "seconds",
        "ms_per_slice",
        "device",
        *CLASS_COLUMNS,
    ]
    assert [r["status"] for r in rows] == ["done"] * 5 + ["failed"]
    assert "s5.nii.gz" in rows[5]["message"] and "not a readable NIfTI" in rows[5]["message"]
    err = capsys.readouterr().err
    assert "5 done, 0 skipped (existed), 1 failed of 6 files" in err
    assert "failed: " in err and "s5.nii.gz" in err
    first = rows[0]
    labels = np.asarray(nib.load(out / "s0_seg.nii.gz").dataobj)
    zooms = nib.load(cohort / "s0.nii.gz").header.get_zooms()
    for value, name in enumerate(["background", "CSF", "grey matter", "white matter"]):
        voxels = int(np.count_nonzero(labels == value))
        assert int(first[f"{name} (voxels)"]) == voxels
        assert float(first[f"{name} (ml)"]) == pytest.approx(voxels * np.prod(zooms) / 1000, 1e-3)
    assert int(first["slices"]) == 2 and 0 < float(first["kept_tokens_percent"]) < 100
    assert 0 < float(first["kept_dependencies_percent"]) < 100
    assert float(first["gflops"]) < float(first["gflops_unpruned"])
    assert float(first["ms_per_slice"]) > 0
    stored = strict_json(out / "s0_seg.json")["statistics"]
    assert float(first["kept_tokens_percent"]) == round(100 * stored["counters"]["kept_tokens"], 2)
    failed = rows[5]
    assert all(failed[c] == "" for c in ("slices", "kept_tokens_percent", "gflops"))


def test_csv_columns_come_from_the_counters_the_model_declares(cohort, tmp_path, monkeypatch):
    (cohort / "s5.nii.gz").unlink()
    weights = save_toy_weights(tmp_path, monkeypatch, n_classes=2)
    out = tmp_path / "out"
    assert main(["predict", str(cohort), "-o", str(out), "--weights", str(weights)]) == 0
    rows = read_rows(out / "apformer-stats.csv")
    assert list(rows[0])[4:12] == [
        "slices",
        "bright_cells_percent",
        "gflops",
        "gflops_unpruned",
        "seconds",
        "ms_per_slice",
        "device",
        "background (ml)",
    ]
    for row in rows:
        stored = strict_json(Path(row["output"]).with_suffix("").with_suffix(".json"))
        fraction = stored["statistics"]["counters"]["bright_cells"]
        assert 0 <= fraction <= 1 and float(row["bright_cells_percent"]) == round(100 * fraction, 2)


@pytest.mark.slow
def test_a_rerun_skips_finished_outputs_and_keeps_their_statistics(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    (cohort / "s5.nii.gz").unlink()
    main(["predict", str(cohort), "-o", str(out)])
    first = read_rows(out / "apformer-stats.csv")
    (out / "s2_seg.nii.gz").unlink()  # as if the first run had been killed before s2
    written = (out / "s0_seg.nii.gz").stat().st_mtime_ns
    assert main(["predict", str(cohort), "-o", str(out)]) == 0
    second = read_rows(out / "apformer-stats.csv")
    assert [r["status"] for r in second] == ["skipped"] * 2 + ["done"] + ["skipped"] * 2
    assert (out / "s0_seg.nii.gz").stat().st_mtime_ns == written
    for a, b in zip(first, second, strict=True):
        assert a["grey matter (voxels)"] == b["grey matter (voxels)"]


@pytest.mark.slow
def test_shards_split_the_cohort_without_overlap(cohort, tmp_path):
    (cohort / "s5.nii.gz").unlink()
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        assert main(["predict", str(cohort), "-o", str(out), "--shard", shard]) == 0
    names = [
        [
            r["input"].rsplit("/", 1)[-1]
            for r in read_rows(out / f"apformer-stats.shard-{k}-of-2.csv")
        ]
        for k in (0, 1)
    ]
    assert names == [["s0.nii.gz", "s2.nii.gz", "s4.nii.gz"], ["s1.nii.gz", "s3.nii.gz"]]
    assert len(list(out.glob("*_seg.nii.gz"))) == 5


@pytest.mark.parametrize("text", ["2/2", "-1/2", "a/b", "1", "0/0"])
def test_bad_shards_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "x", "-o", "y", "--shard", text])
    assert "shard" in capsys.readouterr().err


def test_take_shard_covers_every_file_once(tmp_path):
    files = [tmp_path / f"{k:03d}.nii" for k in range(23)]
    taken = [f for i in range(4) for f in take_shard(files[::-1], parse_shard(f"{i}/4"))]
    assert sorted(taken) == files


@pytest.mark.slow
def test_a_killed_write_leaves_no_output(cohort, tmp_path, monkeypatch):
    """Interrupt the label writer half-way: no label file, so a rerun redoes the file."""
    (cohort / "s5.nii.gz").unlink()
    out = tmp_path / "out"
    real = nib.save

    def dying_save(image, path):
        real(image, path)  # the temporary file is complete on disk ...
        raise KeyboardInterrupt  # ... and the process dies before the rename

    monkeypatch.setattr(nib, "save", dying_save)
    assert main(["predict", str(cohort / "s0.nii.gz"), "-o", str(out)]) == 130
    assert list(out.glob("*.nii.gz")) == [] and list(out.glob(".*part*")) == []
    monkeypatch.setattr(nib, "save", real)
    assert main(["predict", str(cohort / "s0.nii.gz"), "-o", str(out)]) == 0
    assert json.loads((out / "s0_seg.json").read_text())["statistics"]["slices"] == 2


KILLED_WRITER = """
import sys, time, nibabel
real = nibabel.save
def slow_save(image, path):
    real(image, path)
    print("WRITING", flush=True)
    time.sleep(60)  # killed here: the temporary file is on disk, the rename has not happened
nibabel.save = slow_save
from napari_apformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_the_write_leaves_no_output_and_a_rerun_cleans_up(cohort, tmp_path):
    import signal
    import subprocess
    import sys

    source, out = cohort / "s0.nii.gz", tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, "predict", str(source), "-o", str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "WRITING"
        assert list(out.glob(".s0_seg.nii.gz.*.part*"))  # the write is under way
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert not (out / "s0_seg.nii.gz").exists()
    assert main(["predict", str(source), "-o", str(out)]) == 0
    assert nib.load(out / "s0_seg.nii.gz").shape == nib.load(source).shape
    assert sorted(p.name for p in out.iterdir()) == [
        "s0_seg.itksnap.txt",
        "s0_seg.json",
        "s0_seg.nii.gz",
    ]


@pytest.mark.parametrize(
    "text, ours",
    [
        ('{"generator": "napari-apformer 0.4", "labels": []}', True),
        ('{"labels": [{"value": 0, "name": "background", "colour": "#000000"}]}', True),
        ('{"RepetitionTime": 2.3, "TaskName": "rest"}', False),  # BIDS
        ('{"generator": "another tool", "labels": []}', False),
        ('{"labels": ["csf", "grey matter"]}', False),
        ("[1, 2, 3]", False),
        ("{not json", False),
        ("[" * 100_000, False),
    ],
)
def test_only_sidecars_apformer_wrote_count_as_ours(tmp_path, text, ours):
    """What `apformer predict` may replace (with --overwrite) beside its labels."""
    from napari_apformer.cohort import sidecar_blocker

    (tmp_path / "scan.json").write_text(text)
    blocker = sidecar_blocker(tmp_path / "scan.nii.gz")
    assert (blocker is None) == ours
    if not ours:
        assert blocker.startswith(f"{tmp_path / 'scan.json'}: exists and was not written")
