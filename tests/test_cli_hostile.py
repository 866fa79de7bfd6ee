"""`apformer predict` against hostile situations (issue 12, items 10, 15 and 17): outputs that
would land on inputs or on sidecars we did not write, interrupted and concurrent runs,
malformed sidecars beside finished outputs, odd file names, and runs without a terminal.

Most cases run the toy family of test_cli (fast); the processes killed or run side by side
load it too (`CHILD` below)."""

import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

import napari_apformer.cli as cli
from napari_apformer.cli import main
from test_cli import save_toy_weights

TESTS = Path(__file__).parent

# A child process running `apformer ...` with the toy family registered; a label write (PNG or
# NIfTI) first prints WRITING and waits for the file named by $APFORMER_TEST_GO, if set.
CHILD = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
import imageio.v3 as iio, nibabel
from test_cli import ToyNet
from napari_apformer.model import base
base._FAMILIES["toy"] = ToyNet
go = os.environ.get("APFORMER_TEST_GO")

def waiting(real):
    def write(*args, **kwargs):
        result = real(*args, **kwargs)
        if go:
            print("WRITING", flush=True)
            while not os.path.exists(go):
                time.sleep(0.05)
        return result
    return write

nibabel.save = waiting(nibabel.save)
iio.imwrite = waiting(iio.imwrite)
from napari_apformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return save_toy_weights(tmp_path, monkeypatch, n_classes=2)


def picture(path: Path, seed: int = 0, shape=(40, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8))
    return path


def volume(path: Path, slices: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.random.default_rng(1).random((32, 40, slices)) * 1000).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


def rows_of(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def start_child(args, tmp_path, go: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "APFORMER_TEST_GO": str(go) if go else ""}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )


# Item 10: never write onto an input, nor onto a sidecar we did not write --------------------


@pytest.mark.parametrize("how", ["same path", "relative path", "hard link", "symbolic link"])
def test_predict_never_writes_onto_an_input(tmp_path, toy, capsys, monkeypatch, how):
    source = picture(tmp_path / "in" / "scan.png")
    original = source.read_bytes()
    output = {
        "same path": source,
        "relative path": Path("in/../in/scan.png"),
        "hard link": tmp_path / "linked.png",
        "symbolic link": tmp_path / "symlinked.png",
    }[how]
    if how == "hard link":
        os.link(source, output)
    elif how == "symbolic link":
        output.symlink_to(source)
    monkeypatch.chdir(tmp_path)
    code = main(["predict", str(source), "-o", str(output), "--overwrite", "--weights", str(toy)])
    err = errors(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "is an input of this run" in err[0], err
    assert source.read_bytes() == original
    assert not (tmp_path / "in" / "scan.json").exists()


def test_the_statistics_table_is_never_written_onto_an_input(tmp_path, toy, capsys):
    folder = tmp_path / "in"
    a, b = picture(folder / "a.png"), picture(folder / "b.png", 1)
    original = b.read_bytes()
    args = ["predict", str(folder), "-o", str(tmp_path / "out"), "--stats", str(b)]
    assert main([*args, "--weights", str(toy)]) == 1
    assert "is an input of this run" in capsys.readouterr().err
    assert b.read_bytes() == original and a.exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_sidecar_we_did_not_write_is_never_replaced(tmp_path, toy, capsys, overwrite):
    """A BIDS folder: every image has DIR/NAME.json. Labels named DIR/NAME.nii.gz would put
    their sidecar there."""
    bids = tmp_path / "sub-01" / "anat"
    bids.mkdir(parents=True)
    metadata = bids / "sub-01_T1w.json"
    metadata.write_text('{"RepetitionTime": 2.3, "MagneticFieldStrength": 3}\n')
    source = volume(tmp_path / "elsewhere" / "sub-01_T1w.nii.gz", slices=2)
    args = ["predict", str(source), "-o", str(bids / "sub-01_T1w.nii.gz"), *overwrite]
    assert main([*args, "--weights", str(toy)]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "sub-01_T1w.json" in err[0] and "not written by apformer" in err[0]
    assert metadata.read_text() == '{"RepetitionTime": 2.3, "MagneticFieldStrength": 3}\n'
    assert sorted(p.name for p in bids.iterdir()) == ["sub-01_T1w.json"]


def test_an_orphan_sidecar_of_ours_is_replaced(tmp_path, toy):
    """Our own sidecar without its labels (they were deleted) is ours to write again."""
    source, out = picture(tmp_path / "a.png"), tmp_path / "out"
    assert main(["predict", str(source), "-o", str(out), "--weights", str(toy)]) == 0
    (out / "a_seg.png").unlink()
    assert main(["predict", str(source), "-o", str(out), "--weights", str(toy)]) == 0
    assert json.loads((out / "a_seg.json").read_text())["labels_file"]["sha256"] == file_sha256(
        out / "a_seg.png"
    )


# Item 15: folder runs and interruptions ------------------------------------------------------


def test_a_malformed_sidecar_beside_an_existing_output_does_not_stop_the_run(tmp_path, toy, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    for k, name in enumerate("abcd"):
        picture(folder / f"{name}.png", k)
    args = ["predict", str(folder), "-o", str(out), "--weights", str(toy)]
    assert main(args) == 0
    (out / "b_seg.json").write_text("[" * 100_000)  # nested too deeply for json
    (out / "c_seg.json").write_text(
        json.dumps({"generator": "napari-apformer", "statistics": {"volumes_ml": [1, 2]}})
    )
    (out / "d_seg.json").write_bytes(b"\xff\xfe not text")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "internal error" not in err
    for name in "bd":
        [line] = [x for x in err.splitlines() if f"{name}_seg.json" in x]
        assert line.startswith(f"apformer: warning: {out / f'{name}_seg.png'}: exists, skipped")
        assert "not readable JSON" in line
    rows = rows_of(out / "apformer-stats.csv")
    assert [r["status"] for r in rows] == ["skipped"] * 4
    assert rows[0]["slices"] == "1" and rows[1]["slices"] == ""
    assert rows[2]["background (ml)"] == ""  # a list where numbers by class belong: left out


@pytest.mark.slow
def test_a_second_run_never_deletes_the_live_temporary_file_of_the_first(tmp_path, toy):
    source, out = picture(tmp_path / "a.png"), tmp_path / "out"
    go = tmp_path / "go"
    first = start_child(["predict", source, "-o", out, "--weights", toy], tmp_path, go)
    try:
        assert first.stdout.readline().strip() == "WRITING"  # its temporary file is on disk
        [live] = [p for p in out.iterdir() if p.name.startswith(".a_seg.png.")]
        # a second run on the same output, while the first waits before its renames
        assert main(["predict", str(source), "-o", str(out), "--weights", str(toy)]) == 0
        assert live.exists()
    finally:
        go.touch()
        code = first.wait(timeout=120)
    assert code == 0, first.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.json", "a_seg.png"]
    sidecar = json.loads((out / "a_seg.json").read_text())
    assert sidecar["labels_file"]["sha256"] == file_sha256(out / "a_seg.png")


def test_a_temporary_file_of_a_dead_process_is_removed_and_a_live_one_kept(tmp_path, toy):
    source, out = picture(tmp_path / "a.png"), tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    # .NAME.PID-HOST.RANDOM.part.SUFFIX, as io.files names them (PID in 7 digits)
    live = out / f".a_seg.png.{sleeper.pid:07d}-{host}.abcd1234.part.png"
    dead = out / f".a_seg.png.4194303-{host}.efgh5678.part.png"  # no pid is that high
    for path in (live, dead):
        path.write_bytes(b"half a PNG")
    try:
        assert main(["predict", str(source), "-o", str(out), "--weights", str(toy)]) == 0
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_during_a_write_leave_nothing_and_say_so(tmp_path, toy, signum):
    source, out = volume(tmp_path / "s0.nii.gz", slices=2), tmp_path / "out"
    go = tmp_path / "go"
    process = start_child(["predict", source, "-o", out, "--weights", toy], tmp_path, go)
    try:
        assert process.stdout.readline().strip() == "WRITING"
        process.send_signal(signum)
        time.sleep(0.5)
    finally:
        go.touch()
        code = process.wait(timeout=60)
    err = process.stderr.read()
    assert code == 128 + signum, err
    [line] = [x for x in err.splitlines() if x.strip()]
    name = "terminated by SIGTERM" if signum == signal.SIGTERM else "interrupted by Ctrl-C (SIGINT)"
    assert line.startswith(f"apformer: {name} during {source}: its output was not written")
    assert "no temporary file is left" in line
    assert list(out.iterdir()) == []  # no .part, no labels, no sidecar


def test_an_interrupted_overwrite_keeps_the_old_pair(tmp_path, toy, monkeypatch, capsys):
    """Ctrl-C while an --overwrite run writes: the old labels and the old sidecar stay, as a
    pair, and a rerun skips them with their statistics."""
    source, out = volume(tmp_path / "s0.nii.gz", slices=2), tmp_path / "out"
    args = ["predict", str(source), "-o", str(out), "--weights", str(toy)]
    assert main([*args, "--set", "bias=0"]) == 0
    labels, sidecar = (out / "s0_seg.nii.gz").read_bytes(), (out / "s0_seg.json").read_text()
    real = nib.save

    def dying_save(image, path):
        real(image, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", dying_save)
    assert main([*args, "--set", "bias=-4", "--overwrite"]) == 130
    monkeypatch.setattr(nib, "save", real)
    err = capsys.readouterr().err
    assert f"interrupted by Ctrl-C (SIGINT) during {source}: its output was not written" in err
    assert "is unchanged" in err and "0 of 1 files were done before it" in err
    assert (out / "s0_seg.nii.gz").read_bytes() == labels
    assert (out / "s0_seg.json").read_text() == sidecar
    assert sorted(p.name for p in out.iterdir()) == [
        "s0_seg.itksnap.txt",
        "s0_seg.json",
        "s0_seg.nii.gz",
    ]
    assert main(args) == 0
    assert "exists, skipped (--overwrite replaces it)" in capsys.readouterr().err


def test_a_run_stopped_before_the_labels_rename_is_redone(tmp_path, toy, capsys, monkeypatch):
    """As a SIGKILL between the renames of a first run leaves it: the sidecar in place, no
    labels (they are renamed last). A rerun must redo the file, not skip it."""
    from napari_apformer.io import files

    folder, out = tmp_path / "in", tmp_path / "out"
    picture(folder / "a.png")
    args = ["predict", str(folder / "a.png"), "-o", str(out / "a_seg.png"), "--weights", str(toy)]
    real_replace = os.replace

    def killed_at_the_labels(source, destination):
        if Path(destination).name == "a_seg.png":
            raise RuntimeError("killed")
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", killed_at_the_labels)
    main(args)
    assert (out / "a_seg.json").is_file() and not (out / "a_seg.png").exists()
    monkeypatch.setattr(files.os, "replace", real_replace)
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped" not in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.json", "a_seg.png"]
    assert json.loads((out / "a_seg.json").read_text())["labels_file"]["sha256"] == (
        hashlib.sha256((out / "a_seg.png").read_bytes()).hexdigest()
    )


def test_labels_that_do_not_match_their_sidecar_are_not_skipped_silently(tmp_path, toy, capsys):
    """As a SIGKILL between the two renames would leave it: new labels, the old sidecar."""
    folder, out = tmp_path / "in", tmp_path / "out"
    picture(folder / "a.png"), picture(folder / "b.png", 1)
    args = ["predict", str(folder), "-o", str(out), "--weights", str(toy)]
    assert main(args) == 0
    labels = iio.imread(out / "a_seg.png")
    iio.imwrite(out / "a_seg.png", 1 - labels)  # not the labels a_seg.json describes
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if "a_seg" in x]
    assert "does not match its sidecar a_seg.json" in line and "--overwrite redoes it" in line
    rows = rows_of(out / "apformer-stats.csv")
    assert rows[0]["status"] == "skipped" and "does not match" in rows[0]["message"]
    assert rows[0]["slices"] == "" and rows[1]["slices"] == "1"


def test_ctrl_c_in_a_folder_run_says_what_was_left(tmp_path, toy, monkeypatch, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    picture(folder / "a.png"), picture(folder / "b.png", 1)
    real, calls = iio.imwrite, []

    def dying_write(*args, **kwargs):
        calls.append(args[0])
        real(*args, **kwargs)
        if len(calls) == 2:  # b's labels, on disk under their temporary name
            raise KeyboardInterrupt

    monkeypatch.setattr(iio, "imwrite", dying_write)
    assert main(["predict", str(folder), "-o", str(out), "--weights", str(toy)]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"apformer: interrupted by Ctrl-C (SIGINT) during {folder / 'b.png'}: its output was "
        "not written, and no temporary file is left; 1 of 2 files were done before it; "
        f"statistics so far in {out / 'apformer-stats.csv'}"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "a_seg.json",
        "a_seg.png",
        "apformer-stats.csv",
    ]
    assert [r["status"] for r in rows_of(out / "apformer-stats.csv")] == ["done", "failed"]


# Item 17: smaller ---------------------------------------------------------------------------


def test_threads_zero_means_every_core_and_negative_is_refused(tmp_path, toy, capsys):
    source = picture(tmp_path / "a.png")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        args = ["predict", str(source), "-o", str(tmp_path / "out"), "--weights", str(toy)]
        assert main([*args, "--threads", "0"]) == 0
        assert torch.get_num_threads() == cli.usable_cores()
        capsys.readouterr()
        assert main([*args, "--threads", "-1", "--overwrite"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err == [
            "apformer: error: --threads takes a number of CPU threads, 1 or more (0: every "
            "core), not -1"
        ]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["predict", "info", "train"])
def test_device_meta_is_refused(tmp_path, capsys, command):
    args = {
        "predict": ["predict", str(picture(tmp_path / "a.png")), "-o", str(tmp_path / "o")],
        "info": ["info"],
        "train": ["train", "--images", str(tmp_path), "-o", str(tmp_path / "w")],
    }[command]
    assert main([*args, "--device", "meta"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "apformer: error: --device: unknown device 'meta'; use auto, cpu, cuda, cuda:N or mps"
    ]


def test_a_243_byte_file_name_is_segmented(tmp_path, toy, capsys):
    name = "n" * (243 - len(".png")) + ".png"
    source, out = picture(tmp_path / name), tmp_path / "out"
    assert len(os.fsencode(source.name)) == 243
    assert main(["predict", str(source), "-o", str(out), "--weights", str(toy)]) == 0, (
        capsys.readouterr().err
    )
    stem = name[: -len(".png")]
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}_seg.json", f"{stem}_seg.png"]


def test_a_failed_statistics_write_exits_non_zero(tmp_path, toy, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    source = picture(tmp_path / "a.png")
    args = ["predict", str(source), "-o", str(tmp_path / "out"), "--weights", str(toy)]
    assert main([*args, "--stats", str(blocker / "stats.csv")]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "cannot write the statistics" in err[0] and "stats.csv" in err[0]
    assert (tmp_path / "out" / "a_seg.png").exists()


def test_file_names_never_become_spreadsheet_formulas(tmp_path, toy, monkeypatch):
    folder = tmp_path / "in"
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(1).png"]
    for k, name in enumerate(names):
        picture(folder / name, k)
    (folder / "=bad.png").write_text("not a picture")
    monkeypatch.chdir(folder)
    assert main(["predict", ".", "-o", "out", "--weights", str(toy)]) == 1
    with (folder / "out" / "apformer-stats.csv").open(newline="") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")], cells
    assert "'=bad.png" in cells and "'+1.png" in cells and "'@SUM(1).png" in cells
    assert any(c.startswith("'=bad.png: not a readable PNG") for c in cells)


def test_progress_lines_without_a_terminal(tmp_path, toy, capsys, monkeypatch):
    monkeypatch.setattr(cli, "PROGRESS_SECONDS", 0.0)
    folder = tmp_path / "in"
    volume(folder / "a.nii.gz", slices=6), picture(folder / "b.png")
    args = ["predict", str(folder), "-o", str(tmp_path / "out"), "--weights", str(toy)]
    assert main([*args, "--batch-size", "2"]) == 0
    err = capsys.readouterr().err.splitlines()  # captured: not a terminal
    assert f"apformer: [1/2] {folder / 'a.nii.gz'}" in err
    assert f"apformer: [2/2] {folder / 'b.png'}" in err
    assert "apformer: a.nii.gz: 2 of 6 slices" in err and "apformer: a.nii.gz: 4 of 6 slices" in err
