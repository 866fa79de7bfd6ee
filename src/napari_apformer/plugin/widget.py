"""The APFormer dock widget: choose an image and weights, move the pruning settings, watch.

Moving a slider, the slice or the query point reruns only what it affects: sliders and the
slice run the current slice again (from the encoder cache, in a worker); a new query point
only recomputes attention rows. One live run at a time: changes made during a run are
merged into one follow-up run with the newest settings, and a result older than the newest
request is never shown.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    PushButton,
    Slider,
    create_widget,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QCoreApplication, QEvent, QThreadPool, QTimer

from napari_apformer.engine.device import available_devices
from napari_apformer.errors import InputError
from napari_apformer.model.card import ModelCard
from napari_apformer.plugin.image_source import ImageSource, image_source
from napari_apformer.plugin.layers import OutputLayers, legend_html
from napari_apformer.plugin.runs import Engine, LiveOutcome, LiveRequest, Settings
from napari_apformer.weights import DEFAULT_WEIGHTS, shipped_weights

OTHER_WEIGHTS = "other file..."
DEBOUNCE_MS = 0  # merges events queued together; changes during a run merge into one rerun
GATE_RANGE = (-8.0, 4.0)
EXIT_WAIT_MS = 120_000  # at interpreter exit: the longest wait for a run to stop
log = logging.getLogger(__name__)
# Widgets not shut down yet and the workers they started, for the interpreter's exit.
_open_widgets: weakref.WeakSet[APFormerWidget] = weakref.WeakSet()
_started_workers: weakref.WeakSet = weakref.WeakSet()


class APFormerWidget(Container):
    def __init__(self, napari_viewer) -> None:
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self.engine = Engine()
        self._closed = False
        self._generation = 0
        self._live_worker = None
        self._live_pending = False
        self._volume_worker = None
        self._volume_progress = None
        self._volume_notices = 0  # notices of the running volume job already shown
        self._outputs: dict[int, OutputLayers] = {}
        self._last: LiveOutcome | None = None
        self._query_world: tuple[float, ...] | None = None
        self._slice_key: tuple | None = None
        self._build_controls()
        # A child of the widget: Qt deletes it with the widget, never before it at exit.
        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._start_live)
        self._connect_events()
        self._on_weights_changed()
        self._on_image_changed()
        _open_widgets.add(self)

    # ----------------------------------------------------------------------------- controls
    def _build_controls(self) -> None:
        shipped = list(shipped_weights())
        self.image_choice = create_widget(annotation=Image, label="image")
        self.weights_choice = ComboBox(
            label="weights",
            choices=[*shipped, OTHER_WEIGHTS],
            value=DEFAULT_WEIGHTS if DEFAULT_WEIGHTS in shipped else OTHER_WEIGHTS,
        )
        self.weights_file = FileEdit(
            label="weights file", mode="r", filter="*.safetensors *.pth *.pt", visible=False
        )
        self.device_choice = ComboBox(label="device", choices=["auto", *available_devices()])
        self.axis_choice = ComboBox(label="slice axis", choices=self._axis_names)
        self.token_threshold = FloatSlider(
            label="token threshold", min=0.05, max=1.0, step=0.01, value=0.9
        )
        self.gate = FloatSlider(label="dependency gate", min=GATE_RANGE[0], max=GATE_RANGE[1])
        self.per_layer = CheckBox(text="per-layer gates (advanced)", value=False)
        self.layer_gates = [
            FloatSlider(label=f"gate, layer {i + 1}", min=GATE_RANGE[0], max=GATE_RANGE[1])
            for i in range(4)
        ]
        for slider in self.layer_gates:
            slider.visible = False
        self.attention_layer = Slider(label="attention of layer", min=1, max=4, value=4)
        self.attention_before = CheckBox(text="attention before dependency pruning")
        self.click_query = CheckBox(text="a click on the image sets the query point", value=True)
        self.live = CheckBox(text="live: rerun the current slice on every change", value=True)
        self.run_slice = PushButton(text="Run on slice")
        self.run_volume = PushButton(text="Run on volume")
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.legend = Label(label="classes")
        self.readout = Label(label="result", value="not run yet")
        self.extend(
            [
                self.image_choice,
                self.weights_choice,
                self.weights_file,
                self.device_choice,
                self.axis_choice,
                self.token_threshold,
                self.gate,
                self.per_layer,
                *self.layer_gates,
                self.attention_layer,
                self.attention_before,
                self.click_query,
                self.live,
                Container(
                    widgets=[self.run_slice, self.run_volume, self.cancel],
                    layout="horizontal",
                    labels=False,
                ),
                self.legend,
                self.readout,
            ]
        )
        for label in (self.legend, self.readout):
            label.native.setWordWrap(True)

    def _connect_events(self) -> None:
        self.image_choice.changed.connect(self._on_image_changed)
        self.weights_choice.changed.connect(self._on_weights_changed)
        self.weights_file.changed.connect(self._on_weights_changed)
        self.device_choice.changed.connect(self._request_live)
        self.axis_choice.changed.connect(self._on_axis_changed)
        for slider in (self.token_threshold, self.gate, *self.layer_gates):
            slider.changed.connect(self._request_live)
        self.per_layer.changed.connect(self._on_per_layer_changed)
        self.attention_layer.changed.connect(self._show_attention)
        self.attention_before.changed.connect(self._show_attention)
        self.live.changed.connect(self._request_live)
        self.run_slice.clicked.connect(lambda: self._request_live(force=True))
        self.run_volume.clicked.connect(self.start_volume)
        self.cancel.clicked.connect(self.cancel_volume)
        self.viewer.dims.events.current_step.connect(self._on_dims_changed)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse)
        self.native.destroyed.connect(self._shutdown)

    # ------------------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """A run is in progress or about to start (tests and benchmarks wait on this)."""
        return (
            self._live_worker is not None
            or self._volume_worker is not None
            or self._live_pending
            or (not self._closed and self._timer.isActive())
        )

    def settings(self) -> Settings:
        if self.weights_choice.value == OTHER_WEIGHTS:
            path = Path(self.weights_file.value)
            if not path.is_file():
                raise InputError("choose a weights file (.safetensors or the authors' .pth)")
        else:
            path = shipped_weights()[self.weights_choice.value]
        gates: float | tuple[float, ...] = (
            tuple(float(s.value) for s in self.layer_gates)
            if self.per_layer.value
            else float(self.gate.value)
        )
        return Settings(
            path, str(self.device_choice.value), float(self.token_threshold.value), gates
        )

    def current_image(self) -> ImageSource:
        layer = self.image_choice.value
        if layer is None or layer not in self.viewer.layers:
            raise InputError(
                "no image layer: open an image (File > Open) or a sample "
                "(File > Open Sample > APFormer) and choose it in the widget"
            )
        return image_source(layer, tuple(self.viewer.dims.point))

    def slice_axis(self, image: ImageSource) -> int:
        choices = list(self.axis_choice.choices)
        return choices.index(self.axis_choice.value) if image.spatial_ndim == 3 and choices else 0

    # --------------------------------------------------------------------------- handlers
    def _on_image_changed(self, *_: object) -> None:
        self._query_world = None
        self._last = None
        try:
            image = self.current_image()
        except InputError:
            self.axis_choice.reset_choices()
            self.axis_choice.visible = False
            return
        names = image.axis_names()
        self.axis_choice.reset_choices()
        self.axis_choice.visible = bool(names)
        if names:
            self.axis_choice.value = names[self._displayed_slice_axis(image)]
        self.run_volume.enabled = image.spatial_ndim == 3 and self._volume_worker is None
        if image.is_nifti:
            # Scanner y is anterior: draw it upwards, as medical viewers do (x = right stays
            # to the right: neurological convention).
            self.viewer.scene.camera.orientation2d = ("up", "right")
        self._request_live()

    def _axis_names(self, *_: object) -> list[str]:
        try:
            return self.current_image().axis_names()
        except InputError:
            return []

    def _displayed_slice_axis(self, image: ImageSource) -> int:
        """The spatial axis the viewer is slicing now (not displayed), 0 if unclear."""
        ndim = self.viewer.dims.ndim
        hidden = [a - (ndim - 3) for a in self.viewer.dims.not_displayed if a >= ndim - 3]
        return hidden[-1] if len(hidden) == 1 else 0

    def _on_axis_changed(self, *_: object) -> None:
        try:
            image = self.current_image()
        except InputError:
            return
        axis = self.slice_axis(image)
        ndim = self.viewer.dims.ndim
        if image.spatial_ndim == 3 and self.viewer.dims.ndisplay == 2:
            world_axis = ndim - 3 + axis
            order = [a for a in range(ndim) if a != world_axis]
            self.viewer.dims.order = (*order[:-2], world_axis, *order[-2:])
        self._query_world = None
        self._request_live()

    def _on_weights_changed(self, *_: object) -> None:
        other = self.weights_choice.value == OTHER_WEIGHTS
        self.weights_file.visible = other
        try:
            card = self._card()
        except InputError as error:
            show_error(str(error))
            return
        if card is not None:
            self.token_threshold.value = card.token_threshold
            self.gate.value = float(np.mean(card.gates)) if card.gates else -2.0
            for slider, value in zip(self.layer_gates, card.gates, strict=False):
                slider.value = value
            self.legend.value = legend_html(card.class_table())
            if card.placeholder:
                show_warning(
                    f"weights '{card.name}' are a random placeholder, not trained: "
                    "their labels mean nothing"
                )
        self._request_live()

    def _card(self) -> ModelCard | None:
        if self.weights_choice.value == OTHER_WEIGHTS:
            return None
        path = shipped_weights()[self.weights_choice.value]
        return ModelCard.read(path.with_suffix(".json"))

    def _on_per_layer_changed(self, *_: object) -> None:
        for slider in self.layer_gates:
            slider.visible = self.per_layer.value
            if self.per_layer.value:  # start from the gate in use
                slider.value = self.gate.value
        self.gate.enabled = not self.per_layer.value
        self._request_live()

    def _on_dims_changed(self, *_: object) -> None:
        try:
            image = self.current_image()
        except InputError:
            return
        axis = self.slice_axis(image)
        key = (image.leading_index, axis, image.slice_index_at(tuple(self.viewer.dims.point), axis))
        if key != self._slice_key:
            self._request_live()

    def _on_mouse(self, viewer, event):
        """A click (press and release without a drag) on the image sets the query point."""
        if event.type != "mouse_press" or event.button != 1 or not self.click_query.value:
            return
        active = viewer.layers.selection.active
        if active is not None and getattr(active, "mode", "pan_zoom") not in ("pan_zoom",):
            return
        position = tuple(event.position)
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            self.set_query(position)

    # ------------------------------------------------------------------------- live runs
    def _request_live(self, *_: object, force: bool = False) -> None:
        if self._closed or not (self.live.value or force):
            return
        self._generation += 1
        self._timer.start()

    def _start_live(self) -> None:
        if self._closed:
            return
        if self._live_worker is not None:
            self._live_pending = True
            return
        self._live_pending = False
        try:
            image = self.current_image()
            settings = self.settings()
        except InputError as error:
            if self.image_choice.value is not None or self._generation > 1:
                show_error(str(error))
            return
        axis = self.slice_axis(image)
        index = image.slice_index_at(tuple(self.viewer.dims.point), axis)
        self._slice_key = (image.leading_index, axis, index)
        query = None
        if self._query_world is not None:
            query = image.plane_position(self._query_world, axis)
        request = LiveRequest(self._generation, image, axis, index, settings, query)
        worker = create_worker(
            self.engine.run_live,
            request,
            _start_thread=False,
            _connect={"returned": self._on_live_result, "errored": self._on_error},
        )
        worker.finished.connect(self._on_live_finished)
        self._live_worker = worker
        _started_workers.add(worker)
        worker.start()

    def _on_live_finished(self) -> None:
        self._live_worker = None
        if self._live_pending and not self._closed:
            self._start_live()

    def _on_live_result(self, outcome: LiveOutcome) -> None:
        if self._closed or outcome.request.generation != self._generation:
            return  # a newer request is queued: never show an older result over it
        layer = self.image_choice.value
        if layer is None or layer not in self.viewer.layers:
            return
        image = outcome.request.image
        self._last = outcome
        for notice in outcome.notices:
            show_warning(f"APFormer: {notice}")
        card = outcome.card
        table = card.class_table()
        outputs = self._outputs_for(layer, image)
        had_layers = outputs.get("segmentation") is not None
        outputs.show_slice(image, outcome.maps, table, card.n_classes)
        self.legend.value = legend_html(table)
        self.readout.value = _readout(outcome)
        self._show_attention()  # may add to the read-out
        if not had_layers:
            self.viewer.layers.selection.active = layer  # keep the image selected

    def _outputs_for(self, layer, image: ImageSource) -> OutputLayers:
        key = id(layer)
        if key not in self._outputs or self._outputs[key].image_name != image.name:
            self._outputs[key] = OutputLayers(self.viewer, image)
        return self._outputs[key]

    def set_query(self, world: tuple[float, ...]) -> None:
        """Make the world position the query point; attention updates without a rerun."""
        self._query_world = tuple(world)
        outcome = self._last
        if outcome is None:
            self._request_live(force=True)
            return
        request = outcome.request
        row, col = request.image.plane_position(self._query_world, request.axis)
        height, width = outcome.maps.labels.shape
        if not (-0.5 <= row < height - 0.5 and -0.5 <= col < width - 0.5):
            return  # outside the image
        try:
            self.engine.attention_at(outcome, (row, col))
        except Exception as error:  # keep the viewer usable whatever happens
            self._on_error(error)
            return
        self._show_attention()

    def _show_attention(self, *_: object) -> None:
        outcome = self._last
        layer = self.image_choice.value
        if outcome is None or layer is None or layer not in self.viewer.layers:
            return
        request = outcome.request
        maps = outcome.attention_before if self.attention_before.value else outcome.attention_after
        depth = int(self.attention_layer.value) - 1
        outputs = self._outputs_for(layer, request.image)
        outputs.show_attention(
            request.image, request.axis, request.index, outcome.maps.letterbox, maps[depth]
        )
        world = request.image.world_of_plane(request.axis, request.index, *outcome.query)
        outputs.show_query(request.image, world)
        pruned_query = "<br>The query token is pruned: no attention."
        self.readout.value = _readout(outcome) + ("" if maps[depth].any() else pruned_query)

    # ----------------------------------------------------------------------- volume runs
    def start_volume(self) -> None:
        if self._volume_worker is not None:
            return
        try:
            image = self.current_image()
            settings = self.settings()
            if image.spatial_ndim != 3:
                raise InputError(f"'{image.name}' is a 2D image: Run on slice segments it")
        except InputError as error:
            show_error(str(error))
            return
        axis = self.slice_axis(image)
        layer = self.image_choice.value
        worker = create_worker(
            self.engine.volume_steps,
            settings,
            image,
            axis,
            _start_thread=False,
            _connect={"yielded": self._on_volume_step, "errored": self._on_error},
        )
        worker.finished.connect(self._on_volume_finished)
        worker.aborted.connect(self._on_volume_cancelled)
        self._volume_worker = worker
        self._volume_context = (layer, image, axis)
        self._volume_done = 0
        self.run_volume.enabled, self.cancel.enabled = False, True
        _started_workers.add(worker)
        worker.start()

    def cancel_volume(self) -> None:
        if self._volume_worker is not None:
            self._volume_worker.quit()

    def _on_volume_step(self, step) -> None:
        job, done, card = step
        if self._closed:
            return
        layer, image, axis = self._volume_context
        if done is None:
            self._volume_progress = progress(total=job.total, desc="APFormer volume")
            self._volume_notices = 0
            return
        for notice in job.result.notices[self._volume_notices :]:
            show_warning(f"APFormer: {notice}")
        self._volume_notices = len(job.result.notices)
        if layer not in self.viewer.layers:
            self.cancel_volume()
            return
        outputs = self._outputs_for(layer, image)
        seg = outputs.segmentation(image, card.class_table(), card.n_classes)
        finished = job.result.slices[self._volume_done : done.done]
        index = [slice(None)] * 3
        for s in finished:
            index[axis] = s
            seg.data[tuple(index)] = job.result.labels[tuple(index)]
        seg.refresh()
        if self._volume_progress is not None:
            self._volume_progress.update(done.done - self._volume_done)
        self._volume_done = done.done
        stats = job.result.stats
        self.readout.value = f"volume: {done.done} of {done.total} slices<br>{stats.summary()}"

    def _on_volume_cancelled(self) -> None:
        if self._closed:
            return
        total = self._volume_progress.total if self._volume_progress is not None else 0
        show_info(
            f"APFormer: volume run cancelled after {self._volume_done} of {total} slices; "
            "the other slices keep their earlier labels"
        )

    def _on_volume_finished(self) -> None:
        self._volume_worker = None
        if self._volume_progress is not None:
            self._volume_progress.close()
            self._volume_progress = None
        if self._closed:
            return
        self.cancel.enabled = False
        try:
            self.run_volume.enabled = self.current_image().spatial_ndim == 3
        except InputError:
            self.run_volume.enabled = False

    # ---------------------------------------------------------------------------- errors
    def _on_error(self, error: BaseException) -> None:
        if isinstance(error, InputError):
            show_error(f"APFormer: {error}")
        elif isinstance(error, MemoryError):
            show_error(
                "APFormer: not enough memory for this run; close other layers or use a "
                "smaller image"
            )
        else:
            log.exception("APFormer run failed", exc_info=error)
            show_error(f"APFormer: unexpected error ({type(error).__name__}: {error})")

    def _shutdown(self, *_: object) -> None:
        """The widget (or the viewer) is closing: stop runs, touch no Qt object again.

        Runs once, from whichever comes first: the widget's `destroyed` signal or the
        interpreter's exit (`_shutdown_at_exit`). At exit Qt objects may already be deleted.
        """
        if self._closed:
            return
        self._closed = True
        _open_widgets.discard(self)
        if _qt_alive(self._timer):
            self._timer.stop()
        for worker in (self._live_worker, self._volume_worker):
            if worker is not None:
                worker.quit()
        if self._on_mouse in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_mouse)
        self.viewer.dims.events.current_step.disconnect(self._on_dims_changed)


def _qt_alive(obj: object) -> bool:
    """Whether the C++ object behind a Qt wrapper still exists."""
    try:
        obj.objectName()
    except RuntimeError:  # "wrapped C/C++ object ... has been deleted"
        return False
    return True


@atexit.register
def _shutdown_at_exit() -> None:
    """The interpreter exits with widgets open or runs going (a script that never closes
    the viewer): shut the widgets down, let the runs stop and delete the widgets' Qt objects
    while Qt and Python still work.

    Registered after Qt's bindings are imported, so this runs before their own exit
    clean-up, which deletes the Qt objects Python owns (the viewer's window, the workers'
    signals) in no set order. Left to it, a worker still running emits through deleted
    signals and aborts the process; and the widget's Python event handlers (magicgui's
    event filters, superqt's sliders) run while the bindings walk their table of wrappers,
    wrap new objects into it and crash the walk.
    """
    widgets = list(_open_widgets)
    for widget in widgets:
        widget._shutdown()
    workers = list(_started_workers)
    for worker in workers:
        worker.quit()  # volume runs stop at their next batch; a slice run ends on its own
    if workers and not QThreadPool.globalInstance().waitForDone(EXIT_WAIT_MS):
        log.warning("APFormer: a run was still going at exit after %d ms", EXIT_WAIT_MS)
    for widget in widgets:
        native = widget.native
        if _qt_alive(native):
            native.deleteLater()  # the event loop has ended: delete it here and now
            QCoreApplication.sendPostedEvents(native, QEvent.Type.DeferredDelete)


def _readout(outcome: LiveOutcome) -> str:
    s = outcome.stats
    return (
        f"slice {outcome.request.index}<br>"
        f"kept tokens {100 * s.kept_token_fraction:.1f} %<br>"
        f"kept dependencies {100 * s.kept_dependency_fraction:.1f} %<br>"
        f"{s.gflops:.1f} GFLOP spent (unpruned: {s.gflops_unpruned:.1f})<br>"
        f"{1000 * s.seconds:.0f} ms on {s.device}"
    )
