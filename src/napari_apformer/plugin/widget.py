"""The APFormer dock widget: choose an image and weights, move the model's settings, watch.

The controls come from what the weights' model declares (`SegmentationModel.settings()`): a
slider per setting, and for a per-layer setting one slider for all layers plus one per layer
under a check box. Attention controls appear only for a model with query-point attention.
Changing the weights loads them in a worker and rebuilds the controls when the family or
depth changed.

Moving a slider, the slice or the query point reruns only what it affects: sliders and the
slice run the current slice again (from the encoder cache, in a worker); a new query point
only recomputes attention rows (in a worker too: the model never runs on the Qt thread). One
live run at a time: changes made during a run are merged into one follow-up run with the
newest settings, and a result older than the newest request is never shown.
"""

from __future__ import annotations

import atexit
import html
import itertools
import logging
import re
import weakref
from functools import partial
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    Slider,
    create_widget,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QCoreApplication, QEvent, Qt, QThreadPool, QTimer
from qtpy.QtWidgets import QSizePolicy

from napari_apformer.engine.device import available_devices
from napari_apformer.engine.stats import NOT_COUNTED, RunStats
from napari_apformer.errors import InputError
from napari_apformer.io.acquisition import mismatch
from napari_apformer.model.base import MapSpec, Setting, SettingValue
from napari_apformer.model.card import ModelCard
from napari_apformer.plugin import settings_store
from napari_apformer.plugin.adapt import AdaptPanel
from napari_apformer.plugin.image_source import ImageSource, image_source
from napari_apformer.plugin.layer_metadata import (
    SourceInfo,
    mixed_planes_note,
    note_live_plane,
    note_volume_run,
)
from napari_apformer.plugin.layers import (
    OUTPUT_KEY,
    UNIFORM,
    OutputLayers,
    SliceMaps,
    image_cells,
    legend_html,
)
from napari_apformer.plugin.runs import (
    LiveOutcome,
    LiveRequest,
    ModelInfo,
    QueryView,
    Session,
    Settings,
)
from napari_apformer.weights import DEFAULT_WEIGHTS, available_weights, shipped_weights

OTHER_WEIGHTS = "other file..."
MEAN_OF_HEADS = "mean of the heads"
# Edges of the bins in which the read-out counts a probability map's values (see
# distribution_text), and the value every other threshold is compared with.
PROBABILITY_BINS = (0.1, 0.5, 0.9, 0.99)
REFERENCE_THRESHOLD = 0.5
DEBOUNCE_MS = 0  # merges events queued together; changes during a run merge into one rerun
EXIT_WAIT_MS = 120_000  # at interpreter exit: the longest wait for a run to stop
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[a-zA-Z]\.[a-zA-Z]\.)\s+(?=[A-Z])")
REMEMBER_MS = 500  # remembered settings are written this long after the last change
log = logging.getLogger(__name__)
# Widgets not shut down yet and the workers they started, for the interpreter's exit.
_open_widgets: weakref.WeakSet[APFormerWidget] = weakref.WeakSet()
_started_workers: weakref.WeakSet = weakref.WeakSet()


class SettingControls:
    """A setting's controls: one slider; for a per-layer setting also a check box that shows
    one slider per layer (their number from the setting) and takes its values from them."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        low = setting.low + setting.step if setting.low_open else setting.low
        limits = {"min": low, "max": setting.high, "step": setting.step}
        self.slider = FloatSlider(label=setting.label, tooltip=setting_tooltip(setting), **limits)
        self.per_layer: CheckBox | None = None
        self.layer_sliders: list[FloatSlider] = []
        if setting.per_layer:
            self.per_layer = CheckBox(
                text=f"per-layer {setting.label} (advanced)",
                value=False,
                tooltip=(
                    f"Ticked: set the {setting.label} of each of the {setting.per_layer} "
                    f"layers on its own slider. Unticked: one {setting.label} for all layers."
                ),
            )
            self.layer_sliders = [
                FloatSlider(
                    label=f"{setting.label}, layer {i + 1}",
                    tooltip=f"Layer {i + 1} only. {setting_tooltip(setting)}",
                    visible=False,
                    **limits,
                )
                for i in range(setting.per_layer)
            ]
        self.set_values(setting.default)

    @property
    def widgets(self) -> list:
        box = [self.per_layer] if self.per_layer is not None else []
        return [self.slider, *box, *self.layer_sliders]

    @property
    def sliders(self) -> list[FloatSlider]:
        return [self.slider, *self.layer_sliders]

    def value(self) -> SettingValue:
        if self.per_layer is not None and self.per_layer.value:
            return [float(s.value) for s in self.layer_sliders]
        return float(self.slider.value)

    def set_values(self, value: SettingValue) -> None:
        """Show `value` (the weights' default): the mean on the slider for all layers."""
        values = [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]
        self.slider.value = float(np.mean(values))
        if len(values) == 1:
            values = values * len(self.layer_sliders)
        for slider, v in zip(self.layer_sliders, values, strict=False):
            slider.value = v

    def show_per_layer(self) -> None:
        """The check box moved: per-layer sliders shown, starting from the value in use."""
        on = self.per_layer is not None and self.per_layer.value
        for slider in self.layer_sliders:
            slider.visible = on
            if on:
                slider.value = self.slider.value
        self.slider.enabled = not on


class APFormerWidget(Container):
    def __init__(self, napari_viewer) -> None:
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self.session = Session()
        self._closed = False
        self._generation = 0
        self._warned_kind: set[tuple[str, Path]] = set()  # _warn_other_kind, once each
        self._live_worker = None
        self._live_pending = False
        self._model_worker = None  # loads the weights and reads their declarations
        self._model_pending = False
        self._model_info: ModelInfo | None = None  # of the weights the controls are for
        self._controls_key: tuple | None = None
        self.setting_controls: dict[str, SettingControls] = {}
        self._attention_worker = None
        self._attention_pending = False
        self._volume_worker = None
        self._volume_progress = None
        self._volume_notices = 0  # notices of the running volume job already shown
        self._outputs: dict[int, OutputLayers] = {}
        self._distribution: tuple[Setting, MapSpec] | None = None
        self._heads = 1  # attention heads of the model the controls are for
        self._last: LiveOutcome | None = None
        self._query_world: tuple[float, ...] | None = None
        self._slice_key: tuple | None = None
        self._build_controls()
        self.adapt = AdaptPanel(self, _started_workers)  # the "Adapt to this scan" section
        self.extend(self.adapt.widgets)
        # A child of the widget: Qt deletes it with the widget, never before it at exit.
        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._start_live)
        # Choices of the last session: weights and device now, the settings of each
        # weights once their controls exist (_restore_settings); saved a moment after each
        # change, in napari's plugin settings.
        self._remembered = settings_store.load()
        self._restoring = self._restore_choices(self._remembered)
        self._to_save: settings_store.Remembered | None = None
        self._save_timer = QTimer(self.native)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(REMEMBER_MS)
        self._save_timer.timeout.connect(self._save_remembered)
        self._connect_events()
        self._on_weights_changed()
        self._on_image_changed()
        _open_widgets.add(self)

    # ----------------------------------------------------------------------------- controls
    def _build_controls(self) -> None:
        shipped = list(shipped_weights())
        self.image_choice = create_widget(
            annotation=Image,
            label="image",
            options={
                "tooltip": "The image layer to segment. Open one with File > Open, or a "
                "sample with File > Open Sample > APFormer."
            },
        )
        self.weights_choice = ComboBox(
            label="weights",
            choices=self._weights_names,  # a function: lists weights saved since
            value=DEFAULT_WEIGHTS if DEFAULT_WEIGHTS in shipped else OTHER_WEIGHTS,
            tooltip="The trained model that segments. What it was trained on, and so what "
            "it can be trusted with, is shown below. 'other file...' opens a weights file.",
        )
        self.weights_file = FileEdit(
            label="weights file",
            mode="r",
            filter="*.safetensors *.pth *.pt",
            visible=False,
            tooltip="A weights file: this plugin's .safetensors (its .json card beside it) "
            "or the authors' .pth checkpoint.",
        )
        self.weights_about = Label(label="about", value="")
        self.weights_about.tooltip = "What the weights' card says they were (not) made for."
        self.device_choice = ComboBox(
            label="device",
            choices=["auto", *available_devices()],
            tooltip="Where the model runs. 'auto' uses a GPU if there is one, else the CPU.",
        )
        self.axis_choice = ComboBox(
            label="slice axis",
            choices=self._axis_names,
            tooltip="The model segments 2D slices: the axis the volume is cut across. "
            "Choosing one turns the view to that plane; 'Run on volume' cuts along it.",
        )
        # The model's settings go after the axis choice (see _build_setting_controls).
        self.distribution = Label(label="", value="", visible=False)
        self.distribution.tooltip = (
            "How the image's tokens spread over the probability the threshold above is "
            "compared with: a tall bin near the slider's value means a small move of it "
            "changes much; none means it changes nothing."
        )
        self.attention_layer = Slider(
            label="attention of layer",
            min=1,
            max=1,
            value=1,
            tooltip="Which transformer layer's attention to show (1 = the first).",
        )
        self.attention_head = ComboBox(
            label="attention head",
            choices=self._head_names,  # a function: napari resets every choice on layer events
            tooltip="One attention head, or the mean of all heads. Each map's colours run "
            "from 0 to its own peak, so a weak head reads as well as a strong one.",
        )
        self.attention_before = CheckBox(
            text="attention before pruning",
            tooltip="Show the attention as it is without dependency pruning (the gate): "
            "compare with it unticked to see which links the gate removes.",
        )
        self.click_query = CheckBox(
            text="a click on the image sets the query point",
            value=True,
            tooltip="Ticked: a click (without dragging) on the image moves the cyan cross; "
            "the attention then shows where the model looks from that point.",
        )
        self.attention_legend = Label(label="attention", value="")
        self.attention_legend.tooltip = (
            "What the attention layer shows. Hovering over the image shows its value "
            "there in the status bar (with the attention layer selected)."
        )
        self.attention_controls = [
            self.attention_layer,
            self.attention_head,
            self.attention_before,
            self.click_query,
            self.attention_legend,
        ]
        for control in self.attention_controls:
            control.visible = False
        self.live = CheckBox(
            text="live: rerun the current slice on every change",
            value=True,
            tooltip="Ticked: the slice on screen is segmented again whenever a slider, the "
            "slice or the weights change. Unticked: only when you press 'Run on slice'.",
        )
        self.run_slice = PushButton(text="Run on slice", tooltip="Segment the slice on screen now.")
        self.run_volume = PushButton(
            text="Run on volume",
            tooltip="Segment every slice along the slice axis with the settings above. Save "
            "the labels with File > Save Selected Layers (the segmentation layer selected).",
        )
        self.cancel = PushButton(
            text="Cancel",
            enabled=False,
            tooltip="Stop the volume run; slices already done keep their new labels.",
        )
        self.volume_progress = ProgressBar(label="volume run", min=0, max=1, value=0, visible=False)
        self.volume_progress.tooltip = "Slices of the volume run done so far."
        self.legend = Label(label="classes")
        self.legend.tooltip = "The colours of the classes in the segmentation layer."
        self.readout = Label(label="result", value="not run yet")
        self.readout.tooltip = (
            "What the last run did: how much of the image the model kept, what it cost in "
            "operations (GFLOP) and time, the model's size (for compressed weights, against "
            "the weights they came from, and the widths each layer kept), and how many "
            "pixels' labels differ from a pass that prunes nothing (those pixels: the "
            "hidden 'changed by pruning' layer)."
        )
        # Word wrap first: the scroll area takes its minimum width from the first layout.
        for label in (
            self.legend,
            self.readout,
            self.weights_about,
            self.distribution,
            self.attention_legend,
        ):
            label.native.setWordWrap(True)
            label.native.setTextFormat(Qt.TextFormat.RichText)
            # Wrapped to the dock's width, never widening it; as tall as the text needs
            # (napari docks the widget itself, not a scroll area: keep the texts short).
            label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        self.extend(
            [
                self.image_choice,
                self.weights_choice,
                self.weights_file,
                self.weights_about,
                self.device_choice,
                self.axis_choice,
                self.distribution,
                self.attention_layer,
                self.attention_head,
                self.attention_before,
                self.click_query,
                self.attention_legend,
                self.live,
                Container(
                    widgets=[self.run_slice, self.run_volume, self.cancel],
                    layout="horizontal",
                    labels=False,
                ),
                self.volume_progress,
                self.legend,
                self.readout,
            ]
        )

    def _build_setting_controls(self, info: ModelInfo) -> None:
        """Controls for the model's settings and its attention; rebuilt only when what they
        are made from changed (family, settings, depth), else just set to the defaults."""
        key = (
            info.family,
            tuple(_without_default(s) for s in info.settings),
            info.attention_shape,
            info.attention_pruned,
        )
        if key == self._controls_key:
            for setting in info.settings:
                self.setting_controls[setting.name].set_values(setting.default)
            return
        for controls in self.setting_controls.values():
            for widget in controls.widgets:
                self.remove(widget)
        self.setting_controls = {}
        self.remove(self.distribution)
        self._distribution = probability_pair(info)
        position = self.index(self.axis_choice) + 1
        for setting in info.settings:
            controls = SettingControls(setting)
            for widget in controls.widgets:
                self.insert(position, widget)
                position += 1
                pair = self._distribution
                if widget is controls.slider and pair is not None and pair[0] is setting:
                    self.insert(position, self.distribution)  # right under its slider
                    position += 1
            for slider in controls.sliders:
                slider.changed.connect(self._request_live)
                slider.changed.connect(self._remember)
            if controls.per_layer is not None:
                controls.per_layer.changed.connect(partial(self._on_per_layer_changed, controls))
                controls.per_layer.changed.connect(self._remember)
            self.setting_controls[setting.name] = controls
        if self._distribution is None:
            self.insert(position, self.distribution)
        else:
            controls = self.setting_controls[self._distribution[0].name]
            controls.slider.changed.connect(self._show_distribution)
        self.distribution.visible = False
        self._set_text(self.distribution, "")
        layers, heads = info.attention_shape or (1, 1)
        self.attention_layer.max = layers
        self.attention_layer.value = 1  # the first layer's attention is the most local
        self._heads = heads
        self.attention_head.reset_choices()
        self.attention_head.value = MEAN_OF_HEADS
        for control in self.attention_controls:
            control.visible = info.attention_shape is not None
        self.attention_before.visible = info.attention_pruned
        if not info.attention_pruned:
            self.attention_before.value = False
        self._controls_key = key

    def _connect_events(self) -> None:
        self.image_choice.changed.connect(self._on_image_changed)
        self.weights_choice.changed.connect(self._on_weights_changed)
        self.weights_file.changed.connect(self._on_weights_changed)
        self.device_choice.changed.connect(self._request_live)
        for control in (self.weights_choice, self.weights_file, self.device_choice):
            control.changed.connect(self._remember)
        self.axis_choice.changed.connect(self._on_axis_changed)
        self.attention_layer.changed.connect(self._show_attention)
        self.attention_head.changed.connect(self._show_attention)
        self.attention_before.changed.connect(self._show_attention)
        self.live.changed.connect(self._request_live)
        self.run_slice.clicked.connect(lambda: self._request_live(force=True))
        self.run_volume.clicked.connect(self.start_volume)
        self.cancel.clicked.connect(self.cancel_volume)
        self.viewer.dims.events.current_step.connect(self._on_dims_changed)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse)
        self.native.destroyed.connect(self._shutdown)

    def _set_text(self, label: Label, text: str) -> None:
        """A new text for one of the wrapped labels, and the room it needs (Qt does not lay
        the form out again by itself when a wrapped label's text grows)."""
        if label.value == text:
            return
        label.value = text
        if self._closed or not _qt_alive(self.native):
            return
        widget = label.native
        while widget is not None and widget is not self.native:
            widget.updateGeometry()  # the cached heights of the label and its row
            widget = widget.parentWidget()
        layout = self.native.layout()
        layout.invalidate()
        layout.activate()

    # ------------------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """A run is in progress or about to start (tests and benchmarks wait on this)."""
        return (
            self._live_worker is not None
            or self._volume_worker is not None
            or self._model_worker is not None
            or self._attention_worker is not None
            or self.adapt.busy
            or self._live_pending
            or self._model_pending
            or self._attention_pending
            or (not self._closed and self._timer.isActive())
        )

    def weights_path(self) -> Path:
        if self.weights_choice.value == OTHER_WEIGHTS:
            path = Path(self.weights_file.value)
            if not path.is_file():
                raise InputError("choose a weights file (.safetensors or the authors' .pth)")
            return path
        path = available_weights().get(self.weights_choice.value)
        if path is None:
            raise InputError(f"weights '{self.weights_choice.value}' are no longer there")
        return path

    def settings(self) -> Settings:
        """The weights, the device and the settings' values on the controls (none while the
        controls are for other weights: the weights' own values then)."""
        path = self.weights_path()
        values = {}
        if self._controls_ready(path):
            values = {name: c.value() for name, c in self.setting_controls.items()}
        return Settings(path, str(self.device_choice.value), values)

    def _controls_ready(self, path: Path) -> bool:
        return self._model_info is not None and self._model_info.weights == path

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
        self._orient_for(self.image_choice.value)
        self._request_live()

    def _orient_for(self, layer) -> None:
        """Draw a NIfTI layer with scanner y (anterior) upwards, as medical viewers do (x =
        right stays to the right: neurological convention); any other image as napari's
        settings say (row 0 at the top by default), so that a photograph opened after a
        scan is not drawn upside down."""
        if layer is None:
            return
        source = SourceInfo.of(getattr(layer, "metadata", None))
        if source is not None and source.nifti is not None:
            vertical = "up"
        else:
            from napari.settings import get_settings

            vertical = str(get_settings().application.vertical_axis_orientation)
        camera = self.viewer.scene.camera
        orientation = (vertical, str(camera.orientation2d[1]))
        if tuple(str(o) for o in camera.orientation2d) != orientation:
            camera.orientation2d = orientation

    def _on_layer_inserted(self, event) -> None:
        """An image opened now is drawn the right way up (see _orient_for); the widget's
        own output layers (which carry no image of their own) change nothing."""
        layer = getattr(event, "value", None)
        if self._closed or not isinstance(layer, Image):
            return
        if OUTPUT_KEY not in layer.metadata:
            self._orient_for(layer)

    def _weights_names(self, *_: object) -> list[str]:
        return [*available_weights(), OTHER_WEIGHTS]

    def _head_names(self, *_: object) -> list[str]:
        return [MEAN_OF_HEADS, *(f"head {h + 1}" for h in range(self._heads))]

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
            show_error(message_of(error))
            return
        self._set_text(self.weights_about, card_about(card) if card is not None else "")
        if card is not None:
            self.weights_about.tooltip = card_details(card)
        if card is not None:
            self._set_text(self.legend, legend_html(card.class_table()))
            if card.placeholder:
                show_warning(
                    f"weights '{card.name}' are a random placeholder, not trained: "
                    "their labels mean nothing"
                )
        self._load_model()

    def _load_model(self) -> None:
        """Load the chosen weights in a worker; their declarations (re)build the controls,
        then the slice runs. Live runs wait for this."""
        if self._closed:
            return
        if self._model_worker is not None:
            self._model_pending = True
            return
        self._model_pending = False
        try:
            settings = Settings(self.weights_path(), str(self.device_choice.value))
        except InputError:
            self._request_live()  # says what is missing, as any run would
            return
        worker = create_worker(
            self.session.describe,
            settings,
            _start_thread=False,
            _connect={"returned": self._on_model_info, "errored": self._on_error},
        )
        worker.finished.connect(self._on_model_finished)
        self._model_worker = worker
        _started_workers.add(worker)
        worker.start()

    def _on_model_info(self, info: ModelInfo) -> None:
        if self._closed:
            return
        try:
            if info.weights != self.weights_path():
                return  # other weights were chosen meanwhile: their load follows
        except InputError:
            return
        self._model_info = info
        self._build_setting_controls(info)
        self._restore_settings(info)  # what these weights had last time, if anything
        if not self._restoring:
            self._remember()
        self._set_text(self.legend, legend_html(info.card.class_table()))
        self._set_text(self.weights_about, card_about(info.card))
        self.weights_about.tooltip = card_details(info.card)
        self._request_live()

    def _on_model_finished(self) -> None:
        self._model_worker = None
        if self._closed:
            return
        if self._restoring and not self._model_pending:
            self._restoring = False  # restored, or the weights did not load: defaults
            self._remember()
        if self._model_pending:
            self._load_model()
        elif self._live_pending:
            try:
                loaded = self._controls_ready(self.weights_path())
            except InputError:
                loaded = True  # _start_live says what is missing
            if loaded:  # through the timer: merges with a request made by the new controls
                self._timer.start()
            else:
                self._live_pending = False  # the load failed and said why: no retry loop

    def _card(self) -> ModelCard | None:
        if self.weights_choice.value == OTHER_WEIGHTS:
            return None
        return ModelCard.read(self.weights_path().with_suffix(".json"))

    def _on_per_layer_changed(self, controls: SettingControls, *_: object) -> None:
        controls.show_per_layer()
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

    # --------------------------------------------------------------- remembered settings
    def _restore_choices(self, remembered: settings_store.Remembered) -> bool:
        """Weights and device of the last session where they are still there (else the
        defaults stay). True when settings wait for the controls of those weights."""
        names = self._weights_names()
        if remembered.weights == OTHER_WEIGHTS:
            path = Path(remembered.weights_file) if remembered.weights_file else None
            if path is None or not path.is_file():
                return False
            self.weights_file.value = path
            self.weights_choice.value = OTHER_WEIGHTS
        elif remembered.weights in names:
            self.weights_choice.value = remembered.weights
        else:
            return False
        if remembered.device in self.device_choice.choices:
            self.device_choice.value = remembered.device
        return True

    def _weights_key(self) -> str:
        weights = str(self.weights_choice.value)
        file = self.weights_file.value if weights == OTHER_WEIGHTS else None
        return settings_store.weights_key(weights, str(file) if file else None)

    def _restore_settings(self, info: ModelInfo) -> None:
        """The values last used with these weights on their new controls; a value the
        weights' model does not take (unknown, out of range, wrong number of layers) keeps
        its default."""
        remembered = self._remembered.by_weights.get(self._weights_key())
        if remembered is None:
            return
        for setting in info.settings:
            controls = self.setting_controls[setting.name]
            if controls.per_layer is not None:
                controls.per_layer.value = bool(remembered.per_layer.get(setting.name, False))
                controls.show_per_layer()
            if setting.name not in remembered.settings:
                continue
            try:
                value = setting.check(remembered.settings[setting.name])
            except InputError:
                continue
            controls.set_values(value)

    def _remember(self, *_: object) -> None:
        """Note what the controls show now; written REMEMBER_MS after the last change (a
        slider drag is one write). Nothing while the last session's choices are restored."""
        if self._closed or self._restoring:
            return
        weights = str(self.weights_choice.value)
        file = self.weights_file.value
        remembered = self._remembered
        remembered.weights = weights
        remembered.weights_file = str(file) if weights == OTHER_WEIGHTS and file else None
        remembered.device = str(self.device_choice.value)
        try:
            ready = self._controls_ready(self.weights_path())
        except InputError:
            ready = False
        if ready:  # else the controls are still those of the weights before
            entry = settings_store.WeightsSettings()
            for name, controls in self.setting_controls.items():
                entry.settings[name] = controls.value()
                if controls.per_layer is not None:
                    entry.per_layer[name] = bool(controls.per_layer.value)
            remembered.by_weights[self._weights_key()] = entry
        self._to_save = remembered
        self._save_timer.start()

    def _save_remembered(self) -> None:
        remembered, self._to_save = self._to_save, None
        if remembered is not None:
            settings_store.save(remembered)

    # ------------------------------------------------------------------------- live runs
    def _request_live(self, *_: object, force: bool = False) -> None:
        if self._closed or not (self.live.value or force):
            return
        self._generation += 1
        self._timer.start()

    def _start_live(self) -> None:
        if self._closed:
            return
        if self._live_worker is not None or self._model_worker is not None:
            self._live_pending = True
            return
        self._live_pending = False
        try:
            image = self.current_image()
            settings = self.settings()
        except InputError as error:
            if self.image_choice.value is not None or self._generation > 1:
                show_error(message_of(error))
            return
        if not self._controls_ready(settings.weights):
            self._live_pending = True  # the controls first (an earlier load failed)
            self._load_model()
            return
        axis = self.slice_axis(image)
        index = image.slice_index_at(tuple(self.viewer.dims.point), axis)
        self._slice_key = (image.leading_index, axis, index)
        query = None
        if self._query_world is not None:
            query = image.plane_position(self._query_world, axis)
        request = LiveRequest(self._generation, image, axis, index, settings, query)
        worker = create_worker(
            self.session.run_live,
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
        if self._live_pending and not self._closed and self._model_worker is None:
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
        self._warn_other_kind(image, outcome.request.settings.weights, card)
        table = card.class_table()
        outputs = self._outputs_for(layer, image)
        had_layers = outputs.get("segmentation") is not None
        with self.adapt.corrections_kept(outputs.get("segmentation")):
            outputs.show_slice(image, outcome.maps, table, card.n_classes)
        outputs.show_changed(image, outcome.maps, outcome.changed, table)
        self._set_text(self.legend, legend_html(table))
        self._note_live_plane(outputs, outcome)
        self._set_text(self.readout, self._readout(outcome))
        self._show_distribution()
        if outcome.attention is None:
            outputs.remove_attention()
        else:
            self._show_attention()  # may add to the read-out
            if self._query_moved(outcome):
                self._request_attention()  # a click during the run
        if not had_layers:
            self.viewer.layers.selection.active = layer  # keep the image selected

    def _warn_other_kind(self, image: ImageSource, weights: Path, card: ModelCard) -> None:
        """Once per image and weights: the file says it is a kind of scan (an EPI, a CT)
        the weights were not made for."""
        info = image.source
        other = mismatch(info.acquisition, card.made_for) if info is not None else None
        key = (image.name, weights)
        if other is not None and key not in self._warned_kind:
            self._warned_kind.add(key)
            show_warning(f"APFormer: {other} ({info.path.name if info.path else image.name})")

    def _note_live_plane(self, outputs: OutputLayers, outcome: LiveOutcome) -> None:
        """Record the slice a live run wrote into the segmentation volume; warn once when
        it cuts across a finished volume run along another axis (saving would mix them)."""
        request = outcome.request
        seg = outputs.get("segmentation")
        if seg is None or request.image.spatial_ndim != 3:
            return
        axis_name = _axis_name(request.image, request.axis)
        if note_live_plane(seg.metadata, axis_name, request.index):
            show_warning(f"APFormer: {mixed_planes_note(seg.metadata)}")

    def _readout(self, outcome: LiveOutcome) -> str:
        info = self._model_info
        labels = {s.name: s.label for s in info.settings} if info is not None else {}
        lines = live_readout(outcome, labels)
        seg = self._outputs_for(self.image_choice.value, outcome.request.image).get("segmentation")
        note = mixed_planes_note(seg.metadata) if seg is not None else None
        if note is not None and "mixes" in note:
            lines.append(f"<i>{note}</i>")
        return "<br>".join(lines)

    def _show_distribution(self, *_: object) -> None:
        """Under the threshold's slider: how the image's tokens spread over the probability
        it is compared with (from the last run: the probability does not depend on it)."""
        outcome, pair = self._last, self._distribution
        if outcome is None or pair is None or pair[1].name not in outcome.maps.maps:
            self.distribution.visible = False
            return
        setting, spec = pair
        values = outcome.maps.over_image(spec)
        threshold = float(self.setting_controls[setting.name].slider.value)
        self._set_text(self.distribution, distribution_text(values, spec.label, threshold))
        self.distribution.visible = True

    def _outputs_for(self, layer, image: ImageSource) -> OutputLayers:
        key = id(layer)
        if key not in self._outputs or self._outputs[key].image_name != image.name:
            self._outputs[key] = OutputLayers(self.viewer, image)
        return self._outputs[key]

    def set_query(self, world: tuple[float, ...]) -> None:
        """Make the world position the query point; attention updates without a rerun of
        the slice (its attention rows are computed in a worker)."""
        self._query_world = tuple(world)
        if self._last is None:
            self._request_live(force=True)
            return
        self._request_attention()

    def _query_in(self, outcome: LiveOutcome) -> tuple[float, float] | None:
        """The query point in the outcome's slice pixels; None if unset or off the slice."""
        if self._query_world is None:
            return None
        request = outcome.request
        row, col = request.image.plane_position(self._query_world, request.axis)
        height, width = outcome.maps.labels.shape
        if not (-0.5 <= row < height - 0.5 and -0.5 <= col < width - 0.5):
            return None
        return row, col

    def _query_moved(self, outcome: LiveOutcome) -> bool:
        query = self._query_in(outcome)
        return (
            query is not None
            and outcome.attention is not None
            and not np.allclose(query, outcome.attention.query)
        )

    def _request_attention(self) -> None:
        """Attention of the query point in the last live run, in a worker (one at a time;
        clicks during it merge into one follow-up)."""
        outcome = self._last
        if self._closed or outcome is None or outcome.attention is None:
            return
        if self._attention_worker is not None:
            self._attention_pending = True
            return
        self._attention_pending = False
        query = self._query_in(outcome)
        if query is None:
            return  # outside the image
        worker = create_worker(
            self.session.attention_at,
            outcome,
            query,
            _start_thread=False,
            _connect={
                "returned": partial(self._on_attention, outcome),
                "errored": self._on_error,
            },
        )
        worker.finished.connect(self._on_attention_finished)
        self._attention_worker = worker
        _started_workers.add(worker)
        worker.start()

    def _on_attention(self, outcome: LiveOutcome, view: QueryView | None) -> None:
        if self._closed or view is None or outcome is not self._last:
            return  # a newer live run shows (and follows) the query point itself
        outcome.attention = view
        self._show_attention()

    def _on_attention_finished(self) -> None:
        self._attention_worker = None
        if self._attention_pending and not self._closed:
            self._request_attention()

    def _show_attention(self, *_: object) -> None:
        outcome = self._last
        layer = self.image_choice.value
        if outcome is None or layer is None or layer not in self.viewer.layers:
            return
        view = outcome.attention
        if view is None:
            return
        request = outcome.request
        maps = view.before if self.attention_before.value else view.after
        depth = min(int(self.attention_layer.value), maps.shape[0]) - 1
        choices = list(self.attention_head.choices)
        head = max(0, choices.index(self.attention_head.value)) if choices else 0
        heads = maps[depth]
        weights = heads.mean(axis=0) if head == 0 else heads[min(head, len(heads)) - 1]
        outputs = self._outputs_for(layer, request.image)
        peak = outputs.show_attention(
            request.image,
            request.axis,
            request.index,
            outcome.maps.letterbox,
            weights,
            view.stride,
        )
        world = request.image.world_of_plane(request.axis, request.index, *view.query)
        outputs.show_query(request.image, world)
        which = f"layer {depth + 1}, {self.attention_head.value}"
        which += ", before pruning" if self.attention_before.value else ""
        self._set_text(self.attention_legend, attention_legend(which, peak, weights.size))
        pruned_query = "<br>The query token is pruned: no attention."
        self._set_text(self.readout, self._readout(outcome) + ("" if heads.any() else pruned_query))

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
            show_error(message_of(error))
            return
        axis = self.slice_axis(image)
        layer = self.image_choice.value
        worker = create_worker(
            self.session.volume_steps,
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
        self.volume_progress.max = max(1, image.spatial_shape[axis])
        self.volume_progress.value = 0
        self.volume_progress.label = "volume run"
        self.volume_progress.visible = True
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
            self.volume_progress.max = max(1, job.total)
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
        labels = image.to_display(job.result.labels)  # the model array's axes on the shown
        index = [slice(None)] * 3
        with self.adapt.corrections_kept(seg):
            for s in finished:
                index[axis] = s
                seg.data[tuple(index)] = labels[tuple(index)]
            seg.refresh()
        if self._volume_progress is not None:
            self._volume_progress.update(done.done - self._volume_done)
        self._volume_done = done.done
        self.volume_progress.value = done.done
        self.volume_progress.label = f"{done.done} of {done.total} slices"
        self._set_text(self.readout, "<br>".join(volume_readout(job.result, done.done, done.total)))
        if done.done == done.total:
            note_volume_run(seg.metadata, _axis_name(image, axis))

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
        self.volume_progress.visible = False
        try:
            self.run_volume.enabled = self.current_image().spatial_ndim == 3
        except InputError:
            self.run_volume.enabled = False

    # ---------------------------------------------------------------------------- errors
    def _on_error(self, error: BaseException) -> None:
        if isinstance(error, InputError):
            show_error(f"APFormer: {message_of(error)}")
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
        if _qt_alive(self._save_timer):
            self._save_timer.stop()
        self._save_remembered()  # a change made just before closing
        for worker in (self._live_worker, self._volume_worker):
            if worker is not None:
                worker.quit()
        if self._on_mouse in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_mouse)
        self.viewer.dims.events.current_step.disconnect(self._on_dims_changed)
        self.viewer.layers.events.inserted.disconnect(self._on_layer_inserted)
        self.adapt.shutdown()
        self.session.close()  # the model and its caches: a closed viewer keeps no memory


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


def _without_default(setting: Setting) -> tuple:
    """What a setting's controls are made from, but its default (weights of one family and
    depth differ only there)."""
    return tuple(v for k, v in setting.__dict__.items() if k != "default")


def setting_tooltip(setting: Setting) -> str:
    """The setting's own explanation, with its range and the weights' value."""
    default = setting.default
    if isinstance(default, list | tuple):
        shown = ", ".join(f"{v:g}" for v in default)
    else:
        shown = f"{default:g}"
    low = "above" if setting.low_open else "from"
    return (
        f"{setting.help} Range: {low} {setting.low:g} to {setting.high:g}; these weights "
        f"use {shown}."
    )


def probability_pair(info: ModelInfo) -> tuple[Setting, MapSpec] | None:
    """The setting whose slider gets the probability distribution under it, and the map:
    the first single-valued setting on [0, 1] and the first probability map, if the model
    declares both (for APFormer the token threshold and the background probability)."""
    setting = next(
        (s for s in info.settings if not s.per_layer and s.low >= 0.0 and s.high <= 1.0), None
    )
    spec = next((m for m in info.map_specs if m.kind == "probability"), None)
    return (setting, spec) if setting is not None and spec is not None else None


def distribution_text(values: np.ndarray, label: str, threshold: float) -> str:
    """How `values` (one per token over the image) spread over [0, 1], and how many are
    at or above `threshold` and above REFERENCE_THRESHOLD, as two lines."""
    values = np.asarray(values, dtype=float).ravel()
    count = max(1, values.size)
    edges = (0.0, *PROBABILITY_BINS, np.inf)
    shares = np.histogram(values, bins=edges)[0] / count
    names = [
        f"&lt;{PROBABILITY_BINS[0]:g}",
        *(f"{a:g}&ndash;{b:g}" for a, b in itertools.pairwise(PROBABILITY_BINS)),
        f"&ge;{PROBABILITY_BINS[-1]:g}",
    ]
    bins = " &middot; ".join(f"{n} {100 * v:.0f} %" for n, v in zip(names, shares, strict=True))
    at = 100 * np.count_nonzero(values >= threshold) / count
    reference = 100 * np.count_nonzero(values >= REFERENCE_THRESHOLD) / count
    return (
        f"{label} of the image's {values.size} tokens: {bins}<br>"
        f"at or above the slider ({threshold:.2f}): {at:.1f} %; "
        f"at or above {REFERENCE_THRESHOLD:g}: {reference:.1f} %"
    )


def attention_legend(which: str, peak: float, tokens: int) -> str:
    """What the attention layer's values and colours mean (its colour bar is drawn at the
    top right of the canvas)."""
    if peak <= UNIFORM:
        return (
            f"Where the query point (cyan +) looks, {which}: nowhere more than evenly "
            f"(peak {peak:.2f}&times; uniform)."
        )
    return (
        f"Where the query point (cyan +) looks, {which}. Colour bar (top right) in "
        f"multiples of uniform attention (1&times;: even over all {tokens} tokens): "
        f"clear at 1&times; or less, yellow at this map's peak, {peak:.1f}&times;."
    )


def card_about(card: ModelCard) -> str:
    """What the weights' card says they are for, and its limits (what they were not made
    for), as rich text."""
    if card.placeholder:
        about = "Random placeholder weights, not trained: their labels mean nothing."
    elif card.description:
        about = f"<b>Made for:</b> {html.escape(first_sentence(card.description))}"
    else:
        about = (
            "No description: weights without a model card. Class names are numbered and "
            "nothing is known about what they were trained on."
        )
    if card.limits:
        about += "<br><b>Not made for:</b>" + "".join(
            f"<br>&bull; {html.escape(limit_head(line))}" for line in card.limits
        )
    return about


def first_sentence(text: str) -> str:
    """The description's first sentence (the rest is in the about label's tooltip); "e.g."
    and "i.e." end none."""
    return SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def limit_head(limit: str) -> str:
    """A limit up to its first colon (what follows explains it; the about label's tooltip
    has it all): napari docks the widget without a scroll area, so it is as tall as its
    texts, and they stay short."""
    head = limit.split(":", 1)[0].strip()
    return head if head else limit


def card_details(card: ModelCard) -> str:
    """The about label's tooltip: the description and every limit in full."""
    text = "What the weights' card says they were made for."
    if card.description:
        text = card.description
    if card.limits:
        text += "\n\nNot made for:" + "".join(f"\n- {line}" for line in card.limits)
    return text


def message_of(error: BaseException) -> str:
    """The problem first, the file or layer it concerns after it (a message cut short in a
    notification still says what went wrong)."""
    if isinstance(error, InputError) and error.source is not None:
        return f"{error.problem} ({error.source})"
    return str(error)


def _axis_name(image: ImageSource, axis: int) -> str:
    names = image.axis_names()
    return names[axis].split(" (")[0] if names else "the image"


def image_fractions(maps: SliceMaps) -> dict[str, float]:
    """For each mask map: the share of the tokens over the image (not the letterbox's
    padding) that are in the mask, by the map's label."""
    return {
        spec.label: float(np.mean(maps.over_image(spec)))
        for spec in maps.specs
        if spec.kind == "mask" and spec.name in maps.maps
    }


def counters_text(stats: RunStats, on_image: dict[str, float]) -> list[str]:
    """One line per counter; a counter with a mask map of the same label is given over the
    image's tokens, with the model's own figure (padding included) after it."""
    lines = []
    for name in stats.counters:
        label = stats.labels.get(name, name)
        whole = 100 * stats.fraction(name)
        if label in on_image:
            lines.append(
                f"{label}: {100 * on_image[label]:.1f} % of the image's tokens "
                f"({whole:.1f} % with the padding)"
            )
        else:
            lines.append(f"{label}: {whole:.1f} %")
    return lines


def cost_lines(stats: RunStats) -> list[str]:
    """What this run cost and what a full pass costs; the two differ for a rerun that takes
    its encoder from the cache (and may prepare the cache for new settings)."""
    if stats.encoder_cache_hits:
        how = "a rerun, encoder from the cache"
    else:
        how = "nothing cached for this slice yet"
    spent = NOT_COUNTED if stats.gflops is None else f"{stats.gflops:.1f} GFLOP"
    lines = [f"this run: {spent}, {1000 * stats.seconds:.0f} ms on {stats.device} ({how})"]
    # A full pass at the run's settings, once the engine reports it (0: not reported).
    full = stats.gflops_full
    if full:
        lines.append(
            f"a full pass at these settings: {full / max(1, stats.slices):.1f} GFLOP "
            f"(unpruned: {stats.gflops_unpruned / max(1, stats.slices):.1f})"
        )
    else:
        lines.append(
            f"a full pass, unpruned: {stats.gflops_unpruned / max(1, stats.slices):.1f} GFLOP"
        )
    return lines


def count_text(count: float) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    return f"{count / 1e3:.1f} k" if count >= 1e4 else f"{count:.0f}"


def model_size_text(card: ModelCard, params: int) -> str:
    """The model's parameter count; for weights made by `apformer compress` (the card's
    `training.compression`), against the weights they were compressed from, with what each
    layer kept."""
    compression = card.training.get("compression") if isinstance(card.training, dict) else None
    base = compression.get("base_params") if isinstance(compression, dict) else None
    if not isinstance(base, int | float) or base <= 0:
        return f"model: {count_text(params)} parameters"
    name = html.escape(str(compression.get("base_weights") or "its base weights"))
    text = (
        f"compressed from {name}: {count_text(params)} of {count_text(base)} parameters "
        f"({100 * params / base:.1f} %)"
    )
    kept = kept_widths_text(compression)
    return f"{text}; kept per layer: {kept}" if kept else text


def kept_widths_text(compression: dict) -> str:
    """Per searchable dimension (by the short form of its card label): the units each
    layer kept, e.g. "head channels 127, 86, 90, 101; MLP hidden units 345, 306, 280, 290".
    Empty for a card without per-layer counts."""
    layers = compression.get("layers")
    dimensions = compression.get("dimensions")
    if not isinstance(layers, list) or not layers or not isinstance(dimensions, dict):
        return ""
    parts = []
    for name, about in dimensions.items():
        counts = [
            layer.get(f"kept_{name}") if isinstance(layer, dict) else None for layer in layers
        ]
        if not all(isinstance(c, int) for c in counts):
            continue
        label = about.get("label", name) if isinstance(about, dict) else name
        label = html.escape(str(label).split(" (")[0])
        parts.append(f"{label} {', '.join(str(c) for c in counts)}")
    return "; ".join(parts)


def settings_text(values: dict[str, SettingValue], labels: dict[str, str]) -> str:
    """ "token threshold 1, dependency gate -2" (a per-layer setting with one value for all
    layers shows it once)."""
    parts = []
    for name, value in values.items():
        numbers = list(value) if isinstance(value, list | tuple) else [value]
        if len(set(numbers)) == 1:
            numbers = numbers[:1]
        shown = ", ".join(f"{float(v):g}" for v in numbers)
        parts.append(f"{labels.get(name, name)} {shown}")
    return ", ".join(parts)


def changed_text(outcome: LiveOutcome, labels: dict[str, str] | None = None) -> list[str]:
    """The share of the slice's pixels whose label the unpruned pass gives otherwise, and
    against which settings (those of that pass that differ from this run's); no line for a
    model without pruning settings."""
    if outcome.changed is None or outcome.unpruned is None:
        return []
    share = 100 * float(np.mean(outcome.changed)) if outcome.changed.size else 0.0
    differ = {
        name: value
        for name, value in outcome.unpruned.items()
        if not np.allclose(
            np.asarray(value, float), np.asarray(outcome.settings.get(name, value), float)
        )
    }
    against = f"vs. {settings_text(differ, labels or {})}" if differ else "unpruned settings"
    return [f"labels changed by pruning: {share:.1f} % of the image's pixels ({against})"]


def live_readout(outcome: LiveOutcome, labels: dict[str, str] | None = None) -> list[str]:
    """labels: setting name -> its label (the sliders' names)."""
    return [
        f"slice {outcome.request.index}",
        *counters_text(outcome.stats, image_fractions(outcome.maps)),
        *cost_lines(outcome.stats),
        model_size_text(outcome.card, outcome.params),
        *changed_text(outcome, labels),
    ]


def volume_readout(result, done: int, total: int) -> list[str]:
    """The read-out of a volume run after `done` of `total` slices (its maps are over the
    slices in run order)."""
    stats = result.stats
    on_image = {}
    for spec in result.map_specs:
        if spec.kind == "mask":
            cells = image_cells(result.letterbox, spec.stride)
            on_image[spec.label] = float(np.mean(result.maps[spec.name][:done][:, cells]))
    slices = max(1, stats.slices)
    unpruned = f"unpruned: {stats.gflops_unpruned / slices:.1f}"
    cost = (
        f"{NOT_COUNTED} ({unpruned} GFLOP per slice)"
        if stats.gflops is None
        else f"{stats.gflops / slices:.1f} GFLOP per slice ({unpruned})"
    )
    return [
        f"volume: {done} of {total} slices",
        *counters_text(stats, on_image if done else {}),
        f"{cost}, {stats.ms_per_slice:.0f} ms per slice on {stats.device}",
    ]
