"""The widget as a new user meets it (issue 12, items 3 to 8): attention that can be read,
a read-out that does not mislead, plain tooltips, 4D files, volume runs and messages."""

from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_apformer.engine.stats import RunStats  # noqa: E402
from napari_apformer.errors import InputError  # noqa: E402
from napari_apformer.model.base import MapSpec  # noqa: E402
from napari_apformer.plugin import widget as widget_module  # noqa: E402
from napari_apformer.plugin.layer_metadata import (  # noqa: E402
    mixed_planes_note,
    note_live_plane,
    note_volume_run,
)
from napari_apformer.plugin.layers import (  # noqa: E402
    MASK_COLOURS,
    MASK_MIN_DISTANCE,
    MASK_OFF,
    image_cells,
    mask_colour,
    mask_table,
    update_in_place,
)

SAMPLES = Path(widget_module.__file__).parents[1] / "samples"
from widget_helpers import PLUGIN, open_widget, output, wait_idle  # noqa: E402


def shown(widget, control) -> bool:
    return control.native.isVisibleTo(widget.native)


def rgb255(colour: str) -> np.ndarray:
    text = colour.lstrip("#")
    return np.array([int(text[i : i + 2], 16) for i in (0, 2, 4)], float)


def small_volume(tmp_path: Path) -> Path:
    source = nib.load(SAMPLES / "mni152_t1_2mm.nii.gz")
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[20:60, 25:75, 38:46], source.affine), path)
    return path


# ------------------------------------------------------------------------- item 3
def test_attention_is_readable_by_default(viewer, qtbot, notices):
    image, reference = viewer.open_sample(PLUGIN, "mni152_volume")
    assert not reference.visible and "reference" in reference.name  # hidden until asked for
    docked_range = viewer.dims.range
    widget = open_widget(viewer, qtbot)
    assert viewer.dims.range == docked_range  # item 7: docking keeps the sliders' steps
    attention = output(viewer, image, "attention")
    seg = output(viewer, image, "segmentation")
    view = widget._last.attention
    tokens = view.after.shape[-1] * view.after.shape[-2]
    # Values in multiples of uniform attention; colours from 1x to this map's own peak.
    mean_of_heads = view.after[0].mean(axis=0)  # layer 1 is the default
    assert widget.attention_layer.value == 1
    peak = float(mean_of_heads.max() * tokens)
    assert attention.data.max() == pytest.approx(peak, rel=1e-5) and peak > 1
    assert tuple(attention.contrast_limits) == pytest.approx((1.0, peak), rel=1e-5)
    assert attention.colorbar.visible and attention.blending == "translucent"
    assert f"{peak:.1f}&times;" in widget.attention_legend.value
    assert "uniform" in widget.attention_legend.value
    # Each head on its own scale: the weakest head fills the colour range too.
    peaks = view.after[0].max(axis=(1, 2)) * tokens
    weakest = int(np.argmin(peaks))
    widget.attention_head.value = f"head {weakest + 1}"
    assert attention.contrast_limits[1] == pytest.approx(peaks[weakest], rel=1e-5)
    assert attention.data.max() == pytest.approx(peaks[weakest], rel=1e-5)
    # The segmentation as outlines while the attention is shown, filled when it is hidden.
    assert seg.contour > 0
    attention.visible = False
    assert seg.contour == 0
    attention.visible = True
    assert seg.contour > 0
    # Pruned tokens in a colour no class uses.
    kept = output(viewer, image, "kept tokens")
    shade = kept.colormap.map(np.array([MASK_OFF]))[0][:3] * 255
    for entry in widget._last.card.class_table()[1:]:
        assert np.linalg.norm(shade - rgb255(entry["colour"])) >= MASK_MIN_DISTANCE
    assert not [n for n in notices if "error" in n.lower()]


def test_mask_colour_avoids_the_classes():
    assert mask_colour([]) == MASK_COLOURS[0]
    greens = [{"value": 1, "name": "a", "colour": MASK_COLOURS[0]}]
    assert mask_colour(greens) != MASK_COLOURS[0]
    spec = MapSpec("keep", "kept tokens", 8, "mask")
    assert mask_table(spec, greens)[2]["colour"] == mask_colour(greens)


# ------------------------------------------------------------------------- item 4
def test_readout_counts_kept_tokens_over_the_image_and_says_what_a_pass_costs(
    viewer, qtbot, notices
):
    viewer.open_sample(PLUGIN, "mni152_slice")  # 233 x 197: padded sideways
    widget = open_widget(viewer, qtbot)
    maps = widget._last.maps
    spec = next(s for s in maps.specs if s.name == "keep")
    box = maps.letterbox
    # Cells over the image, worked out here from the letterbox's own numbers.
    rows = np.arange(box.grid_shape(spec.stride)[0])
    cols = np.arange(box.grid_shape(spec.stride)[1])
    inside_rows = (rows + 1) * spec.stride > box.top
    inside_rows &= rows * spec.stride < box.top + box.inner_height
    inside_cols = (cols + 1) * spec.stride > box.left
    inside_cols &= cols * spec.stride < box.left + box.inner_width
    cells = inside_rows[:, None] & inside_cols[None, :]
    assert np.array_equal(image_cells(box, spec.stride), cells) and not cells.all()
    over_image = maps.maps["keep"][cells].mean()
    whole = widget._last.stats.fraction("kept_tokens")
    assert over_image != pytest.approx(whole)
    line = widget.readout.value.split("<br>")[1]
    assert line == (
        f"kept tokens: {100 * over_image:.1f} % of the image's tokens "
        f"({100 * whole:.1f} % with the padding)"
    )
    assert "nothing cached" in widget.readout.value
    widget.setting_controls["gate"].slider.value = 0.0  # a rerun from the cache
    wait_idle(qtbot, widget)
    lines = widget.readout.value.split("<br>")
    assert "encoder from the cache" in lines[3]
    assert lines[4].startswith("a full pass")
    assert not [n for n in notices if "error" in n.lower()]


def test_cost_lines_separate_the_rerun_from_a_full_pass():
    stats = RunStats(slices=1, flops=10 * 10**9, flops_unpruned=21 * 10**9, encoder_cache_hits=1)
    lines = widget_module.cost_lines(stats)
    assert lines[0].startswith("this run: 10.0 GFLOP") and "encoder from the cache" in lines[0]
    assert lines[1] == "a full pass, unpruned: 21.0 GFLOP"
    stats.flops_full = 0  # a family that does not report it
    assert widget_module.cost_lines(stats)[1] == "a full pass, unpruned: 21.0 GFLOP"
    stats.flops_full = 14 * 10**9  # what the engine is asked to report (see docs)
    lines = widget_module.cost_lines(stats)
    assert lines[1] == "a full pass at these settings: 14.0 GFLOP (unpruned: 21.0)"


# ------------------------------------------------------------------------- item 5
def test_every_control_has_a_tooltip_and_the_threshold_shows_the_distribution(
    viewer, qtbot, notices
):
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot)

    def controls(container):
        for child in container:
            if isinstance(child, widget_module.Container):
                yield from controls(child)
            else:
                yield child

    for control in controls(widget):  # shown or not (per-layer sliders, weights file, ...)
        assert control.tooltip and len(control.tooltip) > 20, control
    names = [w for w in widget]
    threshold = widget.setting_controls["token_threshold"].slider
    assert names.index(widget.distribution) == names.index(threshold) + 1
    assert shown(widget, widget.distribution)
    spec = next(s for s in widget._last.maps.specs if s.kind == "probability")
    values = widget._last.maps.over_image(spec)
    text = widget.distribution.value
    at = 100 * np.mean(values >= threshold.value)
    assert f"at or above the slider ({threshold.value:.2f}): {at:.1f} %" in text
    # What the threshold prunes is what the model pruned (its kept tokens over the image).
    kept = widget._last.maps.over_image(
        next(s for s in widget._last.maps.specs if s.name == "keep")
    )
    assert np.mean(values >= threshold.value) == pytest.approx(1 - kept.mean(), abs=2 / kept.size)
    # Moving the slider updates it at once (the probability does not depend on it).
    widget.live.value = False
    threshold.value = 0.3
    assert "at or above the slider (0.30)" in widget.distribution.value
    assert f"{100 * np.mean(values >= 0.3):.1f} %" in widget.distribution.value
    assert not [n for n in notices if "error" in n.lower()]


def test_distribution_text():
    values = np.array([0.0, 0.05, 0.2, 0.6, 0.95, 0.995, 1.0, 1.0])
    text = widget_module.distribution_text(values, "background probability", 0.9)
    assert text.startswith("background probability of the image's 8 tokens: &lt;0.1 25 %")
    assert "&ge;0.99 38 %" in text
    assert "at or above the slider (0.90): 50.0 %; at or above 0.5: 62.5 %" in text


# ------------------------------------------------------------------------- item 6
def test_4d_overlays_follow_the_volume_on_screen_and_keep_the_time_steps(
    viewer, qtbot, tmp_path, notices
):
    data = np.random.default_rng(0).integers(0, 100, (24, 20, 16, 3)).astype(np.int16)
    data[4:20, 4:16, 3:13] += 500
    image4d = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    image4d.header.set_xyzt_units("mm", "msec")
    image4d.header["pixdim"][4] = 2000.0
    nib.save(image4d, tmp_path / "series.nii.gz")
    [image] = viewer.open(tmp_path / "series.nii.gz", plugin=PLUGIN)
    assert image.scale[0] == 2000.0
    steps = viewer.dims.nsteps
    widget = open_widget(viewer, qtbot)
    assert viewer.dims.nsteps == steps  # not 2,001 time steps
    for volume in (1, 2):
        viewer.dims.set_point(0, volume * 2000.0)
        wait_idle(qtbot, widget)
        assert widget._last.request.image.leading_index == (volume,)
        for role in ("kept tokens", "attention"):
            layer = output(viewer, image, role)
            assert layer.scale[0] == image.scale[0]
            assert layer.translate[0] == pytest.approx(volume * 2000.0)
            # On screen: the layer's one volume is where the viewer is.
            assert layer.world_to_data(viewer.dims.point)[0] == pytest.approx(0.0)
    assert viewer.dims.nsteps == steps
    assert not [n for n in notices if "error" in n.lower()]
    # Volumes over time are fMRI-like (EPI): said once for this image and these weights.
    [kind] = [n for n in notices if "this looks like" in n]
    assert kind.startswith("APFormer: this looks like an echo-planar EPI scan (its NIfTI header")
    assert kind.endswith(
        "made for T1w MR scans: expect wrong labels (see the weights' limits) (series.nii.gz)"
    )


# ------------------------------------------------------------------------- item 7
def test_volume_progress_mixed_planes_and_orientation(viewer, qtbot, tmp_path, notices):
    path = small_volume(tmp_path)
    [image] = viewer.open(path, plugin=PLUGIN)
    widget = open_widget(viewer, qtbot)
    assert tuple(viewer.scene.camera.orientation2d) == ("up", "right")
    seen = []
    step = widget._on_volume_step

    def watch(item):
        step(item)
        if widget._volume_worker is not None:  # (the end may be reported before the last step)
            seen.append((shown(widget, widget.volume_progress), widget.volume_progress.value))

    widget._on_volume_step = watch
    widget.session.segmenter(widget.settings()).batch_size = 2  # steps to watch
    widget.start_volume()
    wait_idle(qtbot, widget)
    total = image.data.shape[0]
    assert [value for _, value in seen][:3] == [0, 2, 4] and all(on for on, _ in seen)
    assert widget.volume_progress.label == f"{total} of {total} slices"
    assert not shown(widget, widget.volume_progress)  # hidden once the run ended
    seg = output(viewer, image, "segmentation")
    assert mixed_planes_note(seg.metadata) is None
    # A live run along another axis writes a plane across the volume run: said at once.
    widget.axis_choice.value = widget.axis_choice.choices[1]  # coronal
    wait_idle(qtbot, widget)
    note = mixed_planes_note(seg.metadata)
    assert note is not None and "axial volume run" in note and "coronal" in note
    assert sum("mixes" in n for n in notices) == 1
    assert "mixes" in widget.readout.value
    # A PNG opened after the NIfTI is drawn as napari draws pictures, row 0 at the top.
    png = tmp_path / "picture.png"
    iio.imwrite(png, np.random.default_rng(0).integers(0, 255, (40, 60), np.uint8))
    viewer.open(png, plugin=PLUGIN)
    assert tuple(viewer.scene.camera.orientation2d) == ("down", "right")


def test_planes_record():
    metadata: dict = {}
    assert not note_live_plane(metadata, "axial", 3)  # before any volume run
    assert "only the 1 slice(s) live runs made" in mixed_planes_note(metadata)
    note_volume_run(metadata, "axial")
    assert mixed_planes_note(metadata) is None
    assert not note_live_plane(metadata, "axial", 4)  # along the volume's own axis
    assert note_live_plane(metadata, "coronal", 10)  # the first across it
    assert not note_live_plane(metadata, "coronal", 10)
    assert not note_live_plane(metadata, "sagittal", 2)
    note = mixed_planes_note(metadata)
    assert "axial volume run with 2 slice(s) from live runs along coronal, sagittal" in note


# ------------------------------------------------------------------------- item 8
def test_messages_put_the_problem_first_and_the_card_says_what_the_weights_are_for(
    viewer, qtbot, notices, tmp_path
):
    assert widget_module.message_of(InputError("too small", "/data/a.nii")) == (
        "too small (/data/a.nii)"
    )
    widget = open_widget(viewer, qtbot)
    assert "one averaged brain" in widget.weights_about.tooltip  # the card's whole description
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    widget.weights_file.value = tmp_path / "bad.safetensors"
    widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    wait_idle(qtbot, widget)
    errors = [n for n in notices if str(tmp_path) in n]
    assert errors and all(
        not n.removeprefix("APFormer: ").startswith(str(tmp_path)) for n in errors
    )
    assert all(n.endswith(")") for n in errors)


def test_an_update_that_changes_nothing_redraws_nothing(monkeypatch):
    """The attention of the first layer does not move with the token threshold: writing the
    same values, place and contrast again must not refresh the layer (nor its colour bar)."""
    from napari.layers import Image

    values = np.random.default_rng(0).random((8, 6)).astype(np.float32)
    layer = Image(values.copy(), translate=(2.0, 3.0), contrast_limits=(1.0, 5.0))
    refreshed = []
    monkeypatch.setattr(layer, "refresh", lambda **kw: refreshed.append(kw))
    update_in_place(layer, values, (2.0, 3.0), (1.0, 5.0))
    assert refreshed == []
    for change in (
        (values, (2.0, 3.0), (1.0, 6.0)),  # new contrast
        (values + 1, (2.0, 3.0), (1.0, 6.0)),  # new values
        (values + 1, (4.0, 3.0), (1.0, 6.0)),  # moved
    ):
        before = len(refreshed)
        update_in_place(layer, *change)
        assert len(refreshed) > before, change
    assert refreshed[-1]["extent"]
    assert np.array_equal(layer.data, values + 1) and list(layer.contrast_limits) == [1.0, 6.0]
