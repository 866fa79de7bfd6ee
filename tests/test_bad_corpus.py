"""Every reader, the command line and the napari reader against tests/data/bad/ (built by
tests/make_bad_corpus.py): a one-line message naming the file, or the right result."""

import json

import nibabel as nib
import numpy as np
import pytest

from make_bad_corpus import CASES, CORPUS, build
from napari_apformer.cli import main
from napari_apformer.errors import InputError
from napari_apformer.io.formats import read_image_file
from napari_apformer.plugin import _reader

BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(scope="module")
def corpus():
    return build(CORPUS)


@pytest.fixture(scope="module")
def segmenter():
    from napari_apformer.engine.inference import Segmenter
    from napari_apformer.model import load_model
    from napari_apformer.weights import resolve_weights

    return Segmenter(load_model(resolve_weights(None)), device="cpu")


@pytest.mark.parametrize("name", list(BY_NAME))
def test_core_reads_and_prepares_or_says_why_not(corpus, segmenter, name):
    case, path = BY_NAME[name], corpus[name]
    try:
        image = read_image_file(path)
        prepared = segmenter.prepare(image.data, rgb=image.rgb, axis=0, source=path)
    except InputError as error:
        message = str(error)
        assert case.outcome == "reject", message
        assert case.expect in message and message.startswith(str(path))
        assert "\n" not in message
        return
    assert case.outcome == "accept"
    assert prepared.n_slices >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BY_NAME))
def test_command_line(corpus, tmp_path, capsys, name):
    case, path = BY_NAME[name], corpus[name]
    out = tmp_path / "out"
    code = main(["predict", str(path), "-o", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    if case.outcome == "reject":
        assert code == 1
        assert len(err) == 1 and case.expect in err[0] and path.name in err[0], err
        assert not out.exists() or not any(out.iterdir())
        return
    assert code == 0, err
    warnings = [line for line in err if line.startswith("apformer: warning: ")]
    if case.note:  # the reader's note, as one line naming the file
        [line] = warnings
        assert line.startswith(f"apformer: warning: {path}: {case.note}"), line
    else:
        assert not warnings
    [labels_path] = [p for p in out.iterdir() if p.suffix not in (".json", ".txt")]
    table = json.loads(labels_path.with_name(labels_path.name.split(".")[0] + ".json").read_text())
    assert table["statistics"]["slices"] >= 1
    if path.name.endswith(".nii.gz"):
        source, labels = nib.load(path), nib.load(labels_path)
        # a broken sform is replaced by the qform (the reader's note says so)
        expected = source.get_qform() if case.note else source.affine
        assert np.array_equal(labels.affine, expected)
        assert labels.shape == source.shape
        if name == "all_zero.nii.gz":
            assert not np.asarray(labels.dataobj).any()  # all background
    else:
        import imageio.v3 as iio

        image = read_image_file(path)  # planar TIFF: colour is not the first axis on disk
        assert iio.imread(labels_path).shape == image.data.shape[:2]


@pytest.mark.parametrize("name", list(BY_NAME))
def test_napari_reader_never_raises(corpus, monkeypatch, name):
    case, path = BY_NAME[name], corpus[name]
    shown = []
    monkeypatch.setattr(_reader, "_notify_error", shown.append)
    monkeypatch.setattr(_reader, "_notify_warning", shown.append)
    reader = _reader.get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    if case.outcome == "reject" and not case.opens_in_napari:
        assert layers == [(None,)]
        assert len(shown) == 1 and shown[0].endswith(f"({path})") and case.expect in shown[0]
    else:
        [(data, _, kind)] = layers
        assert kind == "image" and np.asarray(data).size > 0
        if name == "sheared.nii.gz":
            assert len(shown) == 1 and "oblique" in shown[0]
        elif case.note:
            assert len(shown) == 1 and case.note in shown[0]
        else:
            assert not shown


@pytest.mark.gui
@pytest.mark.parametrize("name", list(BY_NAME))
def test_viewer_and_widget_with_each_file(make_napari_viewer, qtbot, corpus, monkeypatch, name):
    pytest.importorskip("napari")
    from napari_apformer.plugin import widget as widget_module

    case, path = BY_NAME[name], corpus[name]
    shown = []
    for notify in ("show_error", "show_info", "show_warning"):
        monkeypatch.setattr(widget_module, notify, shown.append)
    monkeypatch.setattr(_reader, "_notify_error", shown.append)
    monkeypatch.setattr(_reader, "_notify_warning", shown.append)
    viewer = make_napari_viewer()
    opened = viewer.open(str(path), plugin="napari-apformer")
    if case.outcome == "reject" and not case.opens_in_napari:
        assert opened == [] and len(viewer.layers) == 0
        assert len(shown) == 1 and case.expect in shown[0]
        return
    [layer] = opened
    _, widget = viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    if case.outcome == "reject":
        assert [m for m in shown if case.expect in m], shown
        assert [each.name for each in viewer.layers] == [layer.name]  # no output layers
        return
    segmentation = viewer.layers[f"{layer.name} segmentation"]
    spatial = layer.data.shape[:-1] if layer.rgb else layer.data.shape
    assert segmentation.data.shape == spatial
    assert np.allclose(segmentation.scale, layer.scale)
    assert np.allclose(segmentation.translate, layer.translate)
