"""The APFormer widget end to end in a real napari viewer (needs an X server: xvfb-run)."""

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_apformer.model import APFormer, ModelCard, save_weights  # noqa: E402
from napari_apformer.plugin import widget as widget_module  # noqa: E402
from napari_apformer.plugin.layers import KEPT  # noqa: E402

PLUGIN = "napari-apformer"
TIMEOUT_MS = 120_000


@pytest.fixture
def notices(monkeypatch):
    shown = []
    for name in ("show_error", "show_info", "show_warning"):
        monkeypatch.setattr(widget_module, name, shown.append)
    return shown


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def open_widget(viewer, qtbot, weights: Path | None = None):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "APFormer")
    if weights is not None:
        widget.weights_file.value = weights
        widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    wait_idle(qtbot, widget)
    return widget


def wait_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def output(viewer, image, role):
    return viewer.layers[f"{image.name} {role}"]


def test_live_run_makes_aligned_layers_that_follow_the_sliders(
    viewer, qtbot, official_weights, notices
):
    [image, _] = viewer.open_sample(PLUGIN, "mni152_volume")
    widget = open_widget(viewer, qtbot, official_weights)
    seg = output(viewer, image, "segmentation")
    assert seg.data.shape == image.data.shape and seg.data.any()
    assert np.allclose(seg.scale, image.scale) and np.allclose(seg.translate, image.translate)
    assert "class" in seg.features and seg.metadata["napari_apformer"].nifti is not None
    index = widget._last.request.index
    assert index == round((viewer.dims.point[-3] - image.translate[0]) / image.scale[0])
    kept = output(viewer, image, "kept tokens")
    assert kept.data.shape == (1, *image.data.shape[1:])
    assert kept.translate[0] == pytest.approx(image.translate[0] + index * image.scale[0])
    attention = output(viewer, image, "attention")
    assert attention.data.shape == (7, 1, *image.data.shape[1:]) and attention.data.max() > 0
    assert output(viewer, image, "query point").data.shape == (1, 3)

    dependencies = output(viewer, image, "kept dependencies")
    before = dependencies.data.copy()
    assert before.sum() > 0
    widget.gate.value = 2.0
    wait_idle(qtbot, widget)
    assert 0 < dependencies.data.sum() < before.sum()

    kept_before = (kept.data == KEPT).mean()
    assert kept_before > 0
    widget.token_threshold.value = 0.5
    wait_idle(qtbot, widget)
    assert (kept.data == KEPT).mean() < kept_before
    assert widget._last.token_threshold == 0.5

    widget.per_layer.value = True
    widget.layer_gates[0].value = -6.0
    wait_idle(qtbot, widget)
    assert widget._last.gates == pytest.approx([-6.0, 2.0, 2.0, 2.0], abs=1e-6)
    assert "kept tokens" in widget.readout.value and "ms on cpu" in widget.readout.value
    assert not [n for n in notices if "error" in n.lower()]


def test_query_point_click_updates_attention_without_a_rerun(
    viewer, qtbot, official_weights, notices
):
    [image] = viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    attention = output(viewer, image, "attention")
    first = attention.data.copy()
    runs = []
    widget.engine.run_live = lambda request: runs.append(request)
    # A click: press, release without moving (through the viewer's mouse callback).
    world = (image.translate[0], image.translate[1] + 40.0, image.translate[2] + 60.0)
    event = SimpleNamespace(type="mouse_press", button=1, position=(0.0, *world))
    clicks = widget._on_mouse(viewer, event)
    next(clicks)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(clicks)
    assert not runs and not widget.busy
    assert not np.array_equal(attention.data, first)
    assert output(viewer, image, "query point").data[0] == pytest.approx(world, abs=1.0)
    widget.attention_before.value = True  # re-rendered from the same rows
    assert not runs
    corner = (image.translate[0], image.translate[1] + 1.0, image.translate[2] + 1.0)
    widget.set_query(corner)  # background: its token is pruned
    assert "pruned" in widget.readout.value and not attention.data.any()
    assert not runs


def test_stale_results_never_overwrite_newer_ones(viewer, qtbot, official_weights):
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    calls = []
    run_live = widget.engine.run_live
    widget.engine.run_live = lambda request: calls.append(request) or run_live(request)
    for value in (0.8, 0.7, 0.6, 0.55, 0.5):
        widget.token_threshold.value = value
        qtbot.wait(5)
    wait_idle(qtbot, widget)
    assert widget._last.token_threshold == 0.5
    assert widget._last.request.generation == widget._generation
    assert len(calls) < 5  # moves made during a run were merged
    old = widget._last
    old.request.generation -= 1
    widget.token_threshold.value = 0.45
    wait_idle(qtbot, widget)
    widget._on_live_result(old)  # arrives late: ignored
    assert widget._last.token_threshold == 0.45


def test_two_hundred_quick_changes_show_only_the_newest(viewer, qtbot, official_weights):
    """Under load (timings and memory: benchmarks/bench_widget.py): the changes merge into
    few runs, the newest value is what is shown, and nothing is left running or added."""
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    names = [layer.name for layer in viewer.layers]
    calls = []
    run_live = widget.engine.run_live
    widget.engine.run_live = lambda request: calls.append(request) or run_live(request)
    values = np.round(np.random.default_rng(0).uniform(0.3, 1.0, 200), 3)
    values[-1] = 0.777
    for value in values:
        widget.token_threshold.value = float(value)
        qtbot.wait(1)
    wait_idle(qtbot, widget)
    assert widget._last.token_threshold == pytest.approx(0.777)
    assert len(calls) < 100 and calls[-1].settings.token_threshold == pytest.approx(0.777)
    assert [layer.name for layer in viewer.layers] == names
    assert not widget.busy and widget._live_worker is None


def test_volume_run_cancel_keeps_the_viewer_consistent(viewer, qtbot, official_weights, notices):
    [image, _] = viewer.open_sample(PLUGIN, "mni152_volume")
    widget = open_widget(viewer, qtbot, official_weights)
    names = [layer.name for layer in viewer.layers]
    seg = output(viewer, image, "segmentation")
    seg.data[...] = 0
    widget.start_volume()
    qtbot.waitUntil(lambda: widget._volume_done > 0, timeout=TIMEOUT_MS)
    widget.cancel.clicked.emit()
    wait_idle(qtbot, widget)
    total = image.data.shape[0]
    assert 0 < widget._volume_done < total
    assert any("cancelled" in n for n in notices)
    done_slices = [s for s in range(total) if seg.data[s].any()]
    assert 0 < len(done_slices) < total
    assert [layer.name for layer in viewer.layers] == names  # no orphan layers
    assert widget.run_volume.enabled and not widget.cancel.enabled


def test_volume_run_finishes_and_saves_in_the_source_geometry(
    viewer, qtbot, official_weights, tmp_path
):
    path = tmp_path / "small.nii.gz"
    source = nib.load(Path(widget_module.__file__).parents[1] / "samples/mni152_t1_2mm.nii.gz")
    small = nib.Nifti1Image(np.asarray(source.dataobj)[:, :, 30:36], source.affine)
    nib.save(small, path)
    [image] = viewer.open(path, plugin=PLUGIN)
    widget = open_widget(viewer, qtbot, official_weights)
    widget.start_volume()
    wait_idle(qtbot, widget)
    seg = output(viewer, image, "segmentation")
    assert all(seg.data[s].any() for s in range(seg.data.shape[0]))
    written = seg.save(str(tmp_path / "labels.nii.gz"), plugin=PLUGIN)
    out = nib.load(written[0])
    assert np.array_equal(out.affine, small.affine) and out.shape == small.shape
    assert np.array_equal(np.asarray(out.dataobj).transpose(2, 1, 0), seg.data)
    assert (tmp_path / "labels.json").is_file()


def test_running_out_of_memory_mid_volume_is_announced_and_loses_nothing(
    viewer, qtbot, official_weights, tmp_path, notices, monkeypatch
):
    import torch

    path = tmp_path / "small.nii.gz"
    source = nib.load(Path(widget_module.__file__).parents[1] / "samples/mni152_t1_2mm.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, 30:40], source.affine), path)
    [image] = viewer.open(path, plugin=PLUGIN)
    widget = open_widget(viewer, qtbot, official_weights)
    segmenter = widget.engine.segmenter(widget.settings())
    decode = segmenter.model.decode

    def tight_memory(encoded, *args, **kwargs):
        if encoded.x4.shape[0] > 4:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return decode(encoded, *args, **kwargs)

    monkeypatch.setattr(segmenter.model, "decode", tight_memory)
    widget.start_volume()
    wait_idle(qtbot, widget)
    assert "APFormer: cpu ran out of memory; continuing with batch size 4" in notices
    seg = output(viewer, image, "segmentation")
    assert all(seg.data[s].any() for s in range(seg.data.shape[0]))


def test_closing_the_viewer_during_a_run(make_napari_viewer, qtbot, official_weights):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "mni152_volume")
    widget = open_widget(viewer, qtbot, official_weights)
    widget.start_volume()
    qtbot.waitUntil(lambda: widget._volume_done > 0, timeout=TIMEOUT_MS)
    worker = widget._volume_worker
    viewer.close()
    qtbot.waitUntil(lambda: widget._volume_worker is None, timeout=TIMEOUT_MS)
    assert widget._closed and worker.abort_requested


def test_no_image_layer_and_unfit_weights_give_notifications(viewer, qtbot, notices, tmp_path):
    widget = open_widget(viewer, qtbot)
    widget.run_slice.clicked.emit()
    wait_idle(qtbot, widget)
    widget.run_volume.clicked.emit()
    assert sum("no image layer" in n for n in notices) >= 2
    colour = APFormer(in_channels=3, n_classes=2)
    save_weights(colour, ModelCard.generic("colour", 3, 2), tmp_path / "colour.safetensors")
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget.weights_file.value = tmp_path / "colour.safetensors"
    widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    wait_idle(qtbot, widget)
    assert any("colour (RGB)" in n for n in notices)


def test_colour_photograph_and_2d_layers(viewer, qtbot, official_weights):
    [image] = viewer.open_sample(PLUGIN, "retina")
    assert image.rgb
    widget = open_widget(viewer, qtbot, official_weights)
    assert not widget.axis_choice.visible and not widget.run_volume.enabled
    seg = output(viewer, image, "segmentation")
    assert seg.data.shape == image.data.shape[:2]
    assert output(viewer, image, "attention").data.shape == (7, *image.data.shape[:2])


def test_reader_in_the_viewer_and_the_segment_menu(viewer, tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    assert viewer.open(tmp_path / "bad.nii.gz", plugin=PLUGIN) == []
    assert len(viewer.layers) == 0
    from napari._app_model import get_app_model

    items = get_app_model().menus.get_menu("napari/layers/segment")
    assert any(PLUGIN in str(getattr(item, "command", item)) for item in items)


def test_axis_choice_turns_the_view_and_4d_files_use_the_volume_on_screen(
    viewer, qtbot, official_weights, tmp_path
):
    data = np.random.default_rng(0).integers(0, 100, (24, 20, 16, 3)).astype(np.int16)
    data[4:20, 4:16, 3:13] += 500
    data[..., 1] *= 2  # the second volume differs
    image4d = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(image4d, tmp_path / "series.nii.gz")
    [image] = viewer.open(tmp_path / "series.nii.gz", plugin=PLUGIN)
    assert image.data.shape == (3, 16, 20, 24)
    viewer.dims.set_point(0, 1)  # the second volume
    widget = open_widget(viewer, qtbot, official_weights)
    assert widget._last.request.image.leading_index == (1,)
    seg = output(viewer, image, "segmentation")
    assert seg.data.shape == (16, 20, 24)
    widget.axis_choice.value = widget.axis_choice.choices[1]  # coronal
    wait_idle(qtbot, widget)
    assert viewer.dims.not_displayed[-1] == viewer.dims.ndim - 2  # y is now the slice axis
    assert widget._last.request.axis == 1
    kept = output(viewer, image, "kept tokens")
    assert kept.data.shape == (1, 16, 1, 24)
