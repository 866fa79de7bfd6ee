"""The APFormer widget end to end in a real napari viewer (needs an X server: xvfb-run)."""

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

import torch  # noqa: E402
from torch import nn  # noqa: E402

from napari_apformer import allocator  # noqa: E402
from napari_apformer.model import APFormer, ModelCard, load_model, save_weights  # noqa: E402
from napari_apformer.model import base as model_base  # noqa: E402
from napari_apformer.model.apformer.attention import LayerSizes  # noqa: E402
from napari_apformer.model.base import InputRule, Prediction, SegmentationModel  # noqa: E402
from napari_apformer.plugin import widget as widget_module  # noqa: E402
from napari_apformer.plugin.layers import MASK_ON  # noqa: E402
from napari_apformer.weights import shipped_weights  # noqa: E402
from widget_helpers import PLUGIN, TIMEOUT_MS, open_widget, output, wait_idle  # noqa: E402


def slider(widget, name, layer=None):
    controls = widget.setting_controls[name]
    return controls.slider if layer is None else controls.layer_sliders[layer]


def float_sliders(widget):
    return [w for w in widget if isinstance(w, widget_module.FloatSlider)]


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
    assert attention.data.shape == (1, *image.data.shape[1:]) and attention.data.max() > 0
    assert attention.translate[0] == kept.translate[0]
    assert output(viewer, image, "query point").data.shape == (1, 3)

    dependencies = output(viewer, image, "kept dependencies")
    before = dependencies.data.copy()
    assert before.sum() > 0
    slider(widget, "gate").value = 2.0
    wait_idle(qtbot, widget)
    assert 0 < dependencies.data.sum() < before.sum()

    kept_before = (kept.data == MASK_ON).mean()
    assert kept_before > 0
    slider(widget, "token_threshold").value = 0.5
    wait_idle(qtbot, widget)
    assert (kept.data == MASK_ON).mean() < kept_before
    assert widget._last.settings["token_threshold"] == 0.5

    widget.setting_controls["gate"].per_layer.value = True
    slider(widget, "gate", 0).value = -6.0
    wait_idle(qtbot, widget)
    assert widget._last.settings["gate"] == pytest.approx([-6.0, 2.0, 2.0, 2.0], abs=1e-6)
    assert "kept tokens" in widget.readout.value and "ms on cpu" in widget.readout.value
    assert not [n for n in notices if "error" in n.lower()]


def test_query_point_click_updates_attention_without_a_rerun(
    viewer, qtbot, official_weights, notices
):
    [image] = viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    attention = output(viewer, image, "attention")
    first = attention.data.copy()
    runs, threads = [], []
    widget.session.run_live = lambda request: runs.append(request)
    attention_at = widget.session.attention_at

    def off_the_gui_thread(*args):
        threads.append(threading.current_thread())
        return attention_at(*args)

    widget.session.attention_at = off_the_gui_thread
    # A click: press, release without moving (through the viewer's mouse callback).
    world = (image.translate[0], image.translate[1] + 40.0, image.translate[2] + 60.0)
    event = SimpleNamespace(type="mouse_press", button=1, position=(0.0, *world))
    clicks = widget._on_mouse(viewer, event)
    next(clicks)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(clicks)
    # No rerun of the slice is asked for: only the attention rows, in a worker.
    assert not runs and widget._live_worker is None and not widget._live_pending
    assert not widget._timer.isActive()
    wait_idle(qtbot, widget)
    assert not runs and not widget.busy
    assert threads and threading.main_thread() not in threads
    assert not np.array_equal(attention.data, first)
    query = output(viewer, image, "query point")
    assert query.data_to_world(query.data[0]) == pytest.approx(world, abs=1.0)
    widget.attention_before.value = True  # re-rendered from the same rows
    assert not runs
    corner = (image.translate[0], image.translate[1] + 1.0, image.translate[2] + 1.0)
    widget.set_query(corner)  # background: its token is pruned
    wait_idle(qtbot, widget)
    assert "pruned" in widget.readout.value and not attention.data.any()
    assert not runs


def test_stale_results_never_overwrite_newer_ones(viewer, qtbot, official_weights):
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    calls = []
    run_live = widget.session.run_live
    widget.session.run_live = lambda request: calls.append(request) or run_live(request)
    for value in (0.8, 0.7, 0.6, 0.55, 0.5):
        slider(widget, "token_threshold").value = value
        qtbot.wait(5)
    wait_idle(qtbot, widget)
    assert widget._last.settings["token_threshold"] == 0.5
    assert widget._last.request.generation == widget._generation
    assert len(calls) < 5  # moves made during a run were merged
    old = widget._last
    old.request.generation -= 1
    slider(widget, "token_threshold").value = 0.45
    wait_idle(qtbot, widget)
    widget._on_live_result(old)  # arrives late: ignored
    assert widget._last.settings["token_threshold"] == 0.45


def test_two_hundred_quick_changes_show_only_the_newest(viewer, qtbot, official_weights):
    """Under load (timings and memory: benchmarks/bench_widget.py): the changes merge into
    few runs, the newest value is what is shown, and nothing is left running or added."""
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    names = [layer.name for layer in viewer.layers]
    calls = []
    run_live = widget.session.run_live
    widget.session.run_live = lambda request: calls.append(request) or run_live(request)
    values = np.round(np.random.default_rng(0).uniform(0.3, 1.0, 200), 3)
    values[-1] = 0.777
    for value in values:
        slider(widget, "token_threshold").value = float(value)
        qtbot.wait(1)
    wait_idle(qtbot, widget)
    assert widget._last.settings["token_threshold"] == pytest.approx(0.777)
    threshold = calls[-1].settings.values["token_threshold"]
    assert len(calls) < 100 and threshold == pytest.approx(0.777)
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
    assert allocator._runs == 0  # the cancelled run no longer holds freed memory


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
    segmenter = widget.session.segmenter(widget.settings())
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
    # Weights for 2-channel images cannot take a grey image (3-channel ones repeat it).
    two = APFormer(in_channels=2, n_classes=2)
    save_weights(two, ModelCard.generic("two", 2, 2), tmp_path / "two.safetensors")
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget.weights_file.value = tmp_path / "two.safetensors"
    widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    wait_idle(qtbot, widget)
    refused = [n for n in notices if "these weights expect 2 channels" in n]
    assert refused and refused[0].startswith("APFormer: these weights expect 2 channels")


def test_colour_photograph_and_2d_layers(viewer, qtbot, official_weights):
    [image] = viewer.open_sample(PLUGIN, "retina")
    assert image.rgb
    widget = open_widget(viewer, qtbot, official_weights)
    assert not widget.axis_choice.visible and not widget.run_volume.enabled
    seg = output(viewer, image, "segmentation")
    assert seg.data.shape == image.data.shape[:2]
    assert output(viewer, image, "attention").data.shape == image.data.shape[:2]


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


def shown(widget, control) -> bool:
    return control.native.isVisibleTo(widget.native)


def test_controls_come_from_the_model_settings(viewer, qtbot, official_weights):
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    model = load_model(official_weights)
    declared = model.settings()
    assert [s.name for s in declared] == ["token_threshold", "gate"]
    assert list(widget.setting_controls) == [s.name for s in declared]
    # One slider per setting, plus one per layer for the per-layer gate (4 layers).
    assert model.depth == 4 and [s.per_layer for s in declared] == [0, 4]
    assert len(float_sliders(widget)) == 2 + 4
    for setting in declared:
        controls = widget.setting_controls[setting.name]
        low = setting.low + setting.step if setting.low_open else setting.low
        assert len(controls.layer_sliders) == setting.per_layer
        assert (controls.per_layer is None) == (setting.per_layer == 0)
        for each in controls.sliders:
            assert (each.min, each.max, each.step) == pytest.approx(
                (low, setting.high, setting.step)
            )
            assert setting.help in each.tooltip and "Range:" in each.tooltip
        assert controls.slider.value == pytest.approx(np.mean(setting.default))
        assert shown(widget, controls.slider) and controls.slider.label == setting.label
    assert (declared[0].low, declared[0].high) == (0.0, 1.0) and declared[0].low_open
    gate = widget.setting_controls["gate"]
    defaults = declared[1].default
    assert [s.value for s in gate.layer_sliders] == pytest.approx(defaults, abs=1e-6)
    assert [s.label for s in gate.layer_sliders] == [
        f"dependency gate, layer {i}" for i in range(1, 5)
    ]
    assert not any(shown(widget, s) for s in gate.layer_sliders)
    gate.per_layer.value = True  # the per-layer sliders appear, starting from the gate in use
    assert all(shown(widget, s) for s in gate.layer_sliders) and not gate.slider.enabled
    assert [s.value for s in gate.layer_sliders] == pytest.approx([gate.slider.value] * 4)
    wait_idle(qtbot, widget)
    # Attention controls: this model has query-point attention, on each of its 4 layers.
    assert all(shown(widget, c) for c in widget.attention_controls)
    assert widget.attention_layer.max == 4 and widget.attention_layer.value == 1
    assert widget.attention_head.choices == (
        "mean of the heads",
        *(f"head {h}" for h in range(1, 7)),
    )
    lines = widget.readout.value.split("<br>")
    assert lines[0] == f"slice {widget._last.request.index}"
    assert lines[1].startswith("kept tokens: ") and "% of the image's tokens" in lines[1]
    assert lines[2].startswith("kept dependencies: ")
    assert lines[3].startswith("this run: ") and " ms on cpu (" in lines[3]
    assert lines[4].startswith("a full pass")


class TinyNet(SegmentationModel):
    """A second family known only to this test: one hidden convolution, no settings, no
    maps, no attention."""

    family = "tiny-test"
    variants: ClassVar = {"default": {"width": 4}}

    def __init__(self, in_channels=1, n_classes=3, variant="default", width=4):
        super().__init__(in_channels, n_classes, variant)
        self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, n_classes, 1)
        )

    @property
    def input_rule(self):
        return InputRule(multiple=8)

    def sizes(self):
        return {"width": self.width}

    @classmethod
    def from_sizes(cls, in_channels, n_classes, variant, sizes):
        return cls(in_channels, n_classes, variant, int(sizes["width"]))

    @classmethod
    def recognise(cls, state):
        if set(state) != {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}:
            return None
        first, last = state["net.0.weight"], state["net.2.weight"]
        return {
            "in_channels": first.shape[1],
            "n_classes": last.shape[0],
            "variant": "default",
            "sizes": {"width": first.shape[0]},
        }

    def predict(self, x, want_attention=False, **settings):
        self.resolve_settings(settings)
        return Prediction(self.net(x))


def test_controls_are_rebuilt_for_another_depth_or_family(
    viewer, qtbot, official_weights, tmp_path, monkeypatch, notices
):
    [image] = viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, official_weights)
    torch.manual_seed(0)
    layers = [LayerSizes(heads=2, dim_head=16, mlp=32, scale=16**-0.5)] * 2
    shallow = APFormer(in_channels=1, n_classes=4, layers=layers).eval()
    save_weights(shallow, ModelCard.generic("shallow", 1, 4), tmp_path / "shallow.safetensors")
    widget.weights_file.value = tmp_path / "shallow.safetensors"
    wait_idle(qtbot, widget)
    gate = widget.setting_controls["gate"]
    assert len(gate.layer_sliders) == 2 and len(float_sliders(widget)) == 2 + 2
    assert widget.attention_layer.max == 2 and widget.attention_layer.value == 1
    assert len(widget._last.settings["gate"]) == 2
    assert widget.attention_head.choices == ("mean of the heads", "head 1", "head 2")
    gate.per_layer.value = True
    gate.layer_sliders[1].value = 1.5
    wait_idle(qtbot, widget)
    assert widget._last.settings["gate"][1] == pytest.approx(1.5)
    assert shown(widget, widget.attention_before)

    # MobileUtr prunes nothing: its heads are shown, the "before pruning" view is not offered.
    widget.weights_file.value = shipped_weights()["mni152-tissue-mobileutr"]
    wait_idle(qtbot, widget)
    assert widget.attention_layer.max == 6 and shown(widget, widget.attention_head)
    assert not shown(widget, widget.attention_before) and not widget.attention_before.value

    monkeypatch.setitem(model_base._FAMILIES, TinyNet.family, TinyNet)
    torch.manual_seed(0)
    save_weights(TinyNet().eval(), ModelCard.generic("tiny", 1, 3), tmp_path / "tiny.safetensors")
    widget.weights_file.value = tmp_path / "tiny.safetensors"
    wait_idle(qtbot, widget)
    assert widget.setting_controls == {} and not float_sliders(widget)
    assert not any(shown(widget, c) for c in widget.attention_controls)
    assert widget._last.settings == {} and widget._last.attention is None
    # Only the segmentation: no maps declared, no attention (the earlier ones are removed).
    assert [layer.name for layer in viewer.layers] == [image.name, f"{image.name} segmentation"]
    assert output(viewer, image, "segmentation").data.shape == image.data.shape
    assert "kept" not in widget.readout.value and "ms on cpu" in widget.readout.value
    widget.set_query((image.translate[0], image.translate[1] + 40.0, image.translate[2] + 60.0))
    wait_idle(qtbot, widget)
    assert len(viewer.layers) == 2
    assert not [n for n in notices if "error" in n.lower()]
