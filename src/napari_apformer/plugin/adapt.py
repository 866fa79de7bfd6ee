"""The widget's "Adapt to this scan" section: fine-tune the weights on slices the user corrected.

The user corrects the widget's segmentation layer with napari's label tools. Each edit (the
layer's `paint` event: brush, eraser, fill, polygon) names the slices it touched along the axis
the viewer was slicing; those slices are listed, and the list can be typed. Listed slices keep
the corrections when the widget reruns the model on them (`corrections_kept`).

"Fine-tune" trains a copy of the chosen weights on the listed slices along the widget's slice
axis (`train.finetune`, imported in the worker so that napari's start-up stays free of torch)
in a worker thread. The worker only puts (step, loss) into a queue that a timer on the Qt
thread reads, so it never touches a Qt object, and it checks a stop flag before each step
(Cancel, or the widget closing). When training has finished the new weights and their card are
written atomically (`save_weights`) into the user weights folder (`weights.user_weights_dir`),
selected in the weights list, and the slice reruns; "Back to base weights" selects the weights
it started from. Cancel or bad input writes nothing and leaves the weights as they were.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QSizePolicy

from napari_apformer.errors import InputError
from napari_apformer.plugin.image_source import ImageSource
from napari_apformer.plugin.layers import OUTPUT_KEY, SEGMENTATION
from napari_apformer.weights import (
    available_weights,
    shown_path,
    user_weights,
    user_weights_dir,
)

if TYPE_CHECKING:
    from napari_apformer.plugin.widget import APFormerWidget

POLL_MS = 100  # how often the Qt thread reads the worker's steps
DEFAULT_STEPS = 60
MAX_NAME = 80  # characters of a saved weights name
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptJob:
    """What one fine-tuning run needs, taken on the Qt thread (labels: a copy)."""

    weights: Path  # the base weights file
    base_name: str  # as the weights list names them
    image: ImageSource
    labels: np.ndarray  # the segmentation layer's data when Fine-tune was pressed
    labels_name: str
    axis: int  # the shown array's slice axis
    axis_name: str
    slices: tuple[int, ...]
    steps: int
    device: str
    out: Path  # <user folder>/<name>.safetensors


@dataclass(frozen=True)
class AdaptOutcome:
    path: Path  # the saved .safetensors (its card beside it)
    name: str  # in the weights list
    report: Any  # train.finetune.FinetuneReport


@dataclass(frozen=True)
class Refused:
    """The corrections or settings could not be used (returned, not raised: napari shows a
    worker's exception with its traceback)."""

    message: str


def run_adapt(
    job: AdaptJob, steps: queue.SimpleQueue, stop: threading.Event
) -> AdaptOutcome | Refused | None:
    """Fine-tune and save (in a worker thread). None when stopped, Refused for bad input:
    nothing written then."""
    from napari_apformer.allocator import freed_memory_kept

    try:
        with freed_memory_kept():
            return _run_adapt(job, steps, stop)
    except InputError as error:
        return Refused(message_text(error))
    except MemoryError:
        return Refused("not enough memory to fine-tune; close other layers or use fewer slices")


def _run_adapt(
    job: AdaptJob, steps: queue.SimpleQueue, stop: threading.Event
) -> AdaptOutcome | None:
    import torch

    from napari_apformer.model.checkpoint import load_model, save_weights, sha256_of
    from napari_apformer.train.finetune import (
        FinetuneCancelled,
        FinetuneOptions,
        finetune,
        finetuned_card,
    )

    model = load_model(job.weights)
    image = job.image
    # The model's array and axes, as live and volume runs and `apformer finetune` use them.
    labels = image.to_display(job.labels)
    options = FinetuneOptions(steps=job.steps, device=job.device)
    try:
        result = finetune(
            model,
            image.model_data(),
            labels,
            image.model_axis(job.axis),
            job.slices,
            spacing=image.model_spacing(),
            rgb=image.rgb,
            options=options,
            progress=lambda step, loss: steps.put((step, loss)),
            cancel=stop.is_set,
            image_source=image.name,
            label_source=job.labels_name,
        )
    except FinetuneCancelled:
        return None
    if stop.is_set():
        return None
    card = finetuned_card(
        model.card,
        result.report,
        options,
        name=job.out.stem,
        axis_name=job.axis_name,
        base_weights=job.base_name,
        base_sha256=model.card.sha256 or sha256_of(job.weights),
        image_name=image.name,
        image_sha256=array_sha256(image.model_data()),
        labels_name=job.labels_name,
        labels_sha256=array_sha256(labels),
        extra={
            "made_in": "the napari widget's 'Adapt to this scan' section",
            "sha256_of": "image and labels: their voxel arrays as the model reads them",
            "torch": torch.__version__,
        },
    )
    try:
        save_weights(result.model, card, job.out)  # temporaries are removed on failure
    except OSError as error:
        raise InputError(f"the weights could not be saved in {job.out.parent}: {error}") from None
    return AdaptOutcome(job.out, job.out.stem, result.report)


def array_sha256(data: np.ndarray) -> str:
    """SHA-256 of an array's values (C order), its dtype and shape."""
    digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    digest.update(np.ascontiguousarray(data).data)
    return digest.hexdigest()


def parse_slice_list(text: str) -> list[int]:
    """'30, 35 40-42' -> [30, 35, 40, 41, 42]; InputError for anything else."""
    found: set[int] = set()
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise InputError(
                f"corrected slices: {item!r} is not a slice number or a range such as 40-42"
            )
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first or last - first > 100_000:
            raise InputError(f"corrected slices: the range {item} runs backwards or too far")
        found.update(range(first, last + 1))
    return sorted(found)


def format_slice_list(slices: set[int] | list[int]) -> str:
    """[30, 31, 32, 40] -> '30-32, 40'."""
    parts: list[str] = []
    ordered = sorted(slices)
    start = None
    for k, value in enumerate(ordered):
        if start is None:
            start = value
        if k + 1 == len(ordered) or ordered[k + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def atom_slices(atom: object, axis: int, shape: tuple[int, ...]) -> set[int]:
    """The slices along `axis` that one of napari's label history atoms changed: a masked
    paint (`slice_key`: a bounding box of slices or indices) or data_setitem's
    (indices, old values, new values)."""
    if len(shape) == 2:
        return {0}
    key = getattr(atom, "slice_key", None)
    if key is not None:
        part = key[axis]
        if isinstance(part, slice):
            return set(range(*part.indices(shape[axis])))
        return {int(part)}
    indices = atom[0]  # type: ignore[index]
    return {int(i) for i in np.unique(np.asarray(indices[axis]))}


def dice_text(report: Any) -> str:
    """The read-out after a run: what was trained, and the held-out slice's Dice."""
    trained = format_slice_list(report.trained_slices)
    lines = [
        f"Fine-tuned: {report.steps} steps in {report.seconds:.0f} s on {report.device}, "
        f"trained on slices {trained}"
        + (" (stopped by the time limit)" if report.stopped_by_time_limit else "")
    ]
    before, after = report.dice_before, report.dice_after
    if before is None or after is None:
        lines.append(
            "No before/after Dice: list 3 or more corrected slices and one is held out to "
            "measure it."
        )
    else:
        lines.append(
            f"Held-out slice {report.held_out_slice}: mean Dice <b>{before.mean:.3f} &rarr; "
            f"{after.mean:.3f}</b>"
        )
        lines.append(
            " &middot; ".join(
                f"{name} {value:.2f} &rarr; {after.per_class.get(name, float('nan')):.2f}"
                for name, value in before.per_class.items()
            )
        )
    return "<br>".join(lines)


def message_text(error: BaseException) -> str:
    """The problem first, then the file or layer it concerns (as the widget words it)."""
    if isinstance(error, InputError) and error.source is not None:
        return f"{error.problem} ({error.source})"
    return str(error)


def slug(text: str) -> str:
    """A file-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "weights"


class AdaptPanel:
    """The "Adapt to this scan" section of `host` (the APFormer widget): its controls, the
    edited slices of the widget's segmentation layers, and the fine-tuning worker."""

    def __init__(self, host: APFormerWidget, started_workers: weakref.WeakSet) -> None:
        self.host = host
        self.viewer = host.viewer
        self._started_workers = started_workers
        self._closed = False
        # id(layer) -> (weak reference to the layer, axis -> edited slices along it)
        self._edits: dict[int, tuple[weakref.ref, dict[int, set[int]]]] = {}
        self._worker = None
        self._job: AdaptJob | None = None
        self._stop = threading.Event()
        self._steps: queue.SimpleQueue = queue.SimpleQueue()
        self._progress: progress | None = None
        self._done = 0
        self._started = 0.0
        self._base: tuple[str, Path] | None = None  # what "Back to base" selects
        self._adapted: str | None = None
        self._showing_list = False
        self._build()
        self._timer = QTimer(self.section.native)  # a child: deleted with the widget
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        for layer in self.viewer.layers:
            self._watch(layer)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        host.image_choice.changed.connect(self.show_list)
        host.axis_choice.changed.connect(self.show_list)
        host.weights_choice.changed.connect(self._show_buttons)

    # ----------------------------------------------------------------------------- controls
    def _build(self) -> None:
        self.toggle = CheckBox(
            text="Adapt to this scan (fine-tune on your corrections)",
            value=False,
            tooltip="Show the section that fine-tunes the weights on slices of this image "
            "whose segmentation you corrected.",
        )
        self.help = Label(
            value="Correct the segmentation on a few slices with napari's label tools "
            "(select the segmentation layer; paint, fill, erase). Edited slices are listed "
            "here and keep your corrections when the model reruns. 3 or more slices: one "
            "is held out to measure the Dice before and after."
        )
        self.slices = LineEdit(
            label="corrected slices",
            value="",
            tooltip="The slices, along the slice axis above, whose labels you corrected: "
            "filled in as you edit; type to add or remove (e.g. 30, 35, 40-42). Only these "
            "slices are trained on.",
        )
        self.clear = PushButton(
            text="Clear list",
            tooltip="Forget the corrected slices of this image (model reruns may then "
            "overwrite them).",
        )
        self.steps = SpinBox(
            label="training steps",
            value=DEFAULT_STEPS,
            min=1,
            max=5000,
            tooltip="Training steps of 4 augmented slices each: more adapt further and take "
            "longer (the time of each shows while it runs).",
        )
        self.start_button = PushButton(
            text="Fine-tune",
            tooltip="Train a copy of the chosen weights on the corrected slices, save it in "
            "your weights folder and select it.",
        )
        self.cancel = PushButton(
            text="Cancel", enabled=False, tooltip="Stop fine-tuning; nothing is saved."
        )
        self.undo = PushButton(
            text="Back to base weights",
            enabled=False,
            tooltip="Select the weights the last fine-tuning started from.",
        )
        self.progress_bar = ProgressBar(label="fine-tuning", min=0, max=1, value=0, visible=False)
        self.progress_bar.tooltip = "Training steps of the fine-tuning run done so far."
        self.help.tooltip = (
            "Fine-tuning adapts the weights to this image: it trains them further on the "
            "slices you corrected."
        )
        self.status = Label(label="result", value="")
        self.status.tooltip = "Progress and loss during fine-tuning; the Dice afterwards."
        for label in (self.help, self.status):
            label.native.setWordWrap(True)
            label.native.setTextFormat(Qt.TextFormat.RichText)
            label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        self.section = Container(
            widgets=[
                self.help,
                self.slices,
                self.steps,
                Container(
                    widgets=[self.start_button, self.cancel], layout="horizontal", labels=False
                ),
                Container(widgets=[self.clear, self.undo], layout="horizontal", labels=False),
                self.progress_bar,
                self.status,
            ],
            visible=False,
        )
        self.toggle.changed.connect(self._on_toggle)
        self.slices.changed.connect(self._on_list_typed)
        self.clear.clicked.connect(self.clear_list)
        self.start_button.clicked.connect(self.start)
        self.cancel.clicked.connect(self.cancel_run)
        self.undo.clicked.connect(self.back_to_base)

    @property
    def widgets(self) -> list:
        """What the host adds to its layout."""
        return [self.toggle, self.section]

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _on_toggle(self, *_: object) -> None:
        self.section.visible = bool(self.toggle.value)
        if self.toggle.value:
            self.show_list()

    def _set_status(self, text: str) -> None:
        self.host._set_text(self.status, text)

    # ---------------------------------------------------------------------- edited slices
    def _on_layer_inserted(self, event) -> None:
        if not self._closed:
            self._watch(getattr(event, "value", None))

    def _watch(self, layer) -> None:
        """Follow the edits of a segmentation layer the widget made."""
        layer = unwrapped(layer)
        if not isinstance(layer, Labels) or layer.metadata.get(OUTPUT_KEY) != SEGMENTATION:
            return
        entry = self._edits.get(id(layer))
        if entry is not None and entry[0]() is layer:
            return
        self._edits[id(layer)] = (weakref.ref(layer), {})
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)

    def _edits_of(self, layer) -> dict[int, set[int]]:
        layer = unwrapped(layer)
        entry = self._edits.get(id(layer)) if layer is not None else None
        return entry[1] if entry is not None and entry[0]() is layer else {}

    def _painted_axis(self, layer) -> int:
        """The layer axis the viewer is slicing across (the widget's axis in a 3D view)."""
        if layer.ndim == 2:
            return 0
        world = self.viewer.dims.ndim
        hidden = [a - (world - layer.ndim) for a in self.viewer.dims.not_displayed]
        hidden = [a for a in hidden if a >= 0]
        if len(hidden) == 1:
            return hidden[0]
        try:
            return self.host.slice_axis(self.host.current_image())
        except InputError:
            return 0

    def _on_paint(self, event) -> None:
        layer = unwrapped(event.source)
        entry = self._edits.get(id(layer))
        if self._closed or entry is None or entry[0]() is not layer:
            return
        axis = self._painted_axis(layer)
        edited = self._edits[id(layer)][1].setdefault(axis, set())
        for atom in event.value:
            edited.update(atom_slices(atom, axis, tuple(layer.data.shape)))
        self.show_list()

    def _on_data(self, event) -> None:
        """The layer's whole array was replaced: which slices are corrected is unknown."""
        layer = unwrapped(event.source)
        if self._closed or not self._edits_of(layer):
            return
        self._edits[id(layer)] = (weakref.ref(layer), {})
        self.show_list()
        self._set_status("The segmentation's data was replaced: list the corrected slices again.")

    def _current(self) -> tuple[ImageSource, int, Labels | None]:
        """The widget's image, its slice axis and its segmentation layer (None if none)."""
        image = self.host.current_image()
        layer = self.host._outputs_for(self.host.image_choice.value, image).get(SEGMENTATION)
        return image, self.host.slice_axis(image), layer

    def show_list(self, *_: object) -> None:
        """The edited slices of the current image along the current axis, in the text box."""
        if self._closed:
            return
        try:
            _, axis, layer = self._current()
        except InputError:
            return
        text = format_slice_list(self._edits_of(layer).get(axis, set()))
        if self.slices.value != text:
            self._showing_list = True
            try:
                self.slices.value = text
            finally:
                self._showing_list = False

    def _on_list_typed(self, *_: object) -> None:
        if self._showing_list or self._closed:
            return
        try:
            listed = parse_slice_list(str(self.slices.value))
            _, axis, layer = self._current()
        except InputError as error:
            self._set_status(message_text(error))
            return
        if layer is None:
            self._set_status("Segment a slice first: the corrections go on its segmentation.")
            return
        self._watch(layer)
        self._edits[id(unwrapped(layer))][1][axis] = set(listed)

    def clear_list(self, *_: object) -> None:
        try:
            _, _, layer = self._current()
        except InputError:
            return
        layer = unwrapped(layer)
        if layer is not None and id(layer) in self._edits:
            self._edits[id(layer)] = (weakref.ref(layer), {})
        self.show_list()

    @contextmanager
    def corrections_kept(self, layer) -> Iterator[None]:
        """The edited slices of `layer` as they are now are put back after the block (a
        model run that writes its labels over them)."""
        saved = []
        if layer is not None:
            shape = tuple(layer.data.shape)
            for axis, indices in self._edits_of(layer).items():
                for index in indices:
                    if len(shape) == 2:
                        key: tuple = (slice(None), slice(None))
                    elif 0 <= index < shape[axis]:
                        key = tuple(index if a == axis else slice(None) for a in range(3))
                    else:
                        continue
                    saved.append((key, np.array(layer.data[key])))
        try:
            yield
        finally:
            if saved:
                for key, plane in saved:
                    layer.data[key] = plane
                layer.refresh()

    # ---------------------------------------------------------------------------- running
    def _make_job(self) -> AdaptJob:
        host = self.host
        image, axis, layer = self._current()
        if layer is None:
            raise InputError(
                "no segmentation to learn from: segment a slice (Run on slice), correct it "
                "with napari's label tools, then fine-tune"
            )
        slices = tuple(parse_slice_list(str(self.slices.value)))
        settings = host.settings()
        names = image.axis_names()
        axis_name = names[axis].split(" (")[0] if names else "the image"
        base_name = str(host.weights_choice.value)
        if base_name not in available_weights():  # "other file..."
            base_name = settings.weights.stem
        return AdaptJob(
            weights=settings.weights,
            base_name=base_name,
            image=image,
            labels=np.array(layer.data, copy=True),
            labels_name=layer.name,
            axis=axis,
            axis_name=axis_name,
            slices=slices,
            steps=int(self.steps.value),
            device=settings.device,
            out=new_weights_path(base_name, image.name),
        )

    def start(self, *_: object) -> None:
        if self._worker is not None or self._closed:
            return
        try:
            job = self._make_job()
        except InputError as error:
            self._refused(error)
            return
        self._stop = threading.Event()
        self._steps = queue.SimpleQueue()
        worker = create_worker(
            run_adapt,
            job,
            self._steps,
            self._stop,
            _start_thread=False,
            _connect={"returned": self._on_returned, "errored": self._on_error},
        )
        worker.finished.connect(self._on_finished)
        self._worker, self._job, self._done = worker, job, 0
        self._started = time.monotonic()
        if self._base is None or self.host.weights_choice.value != self._adapted:
            # From adapted weights again: "Back to base" still goes to the first base.
            self._base = (str(self.host.weights_choice.value), Path(self.host.weights_file.value))
        self._progress = progress(total=job.steps, desc="APFormer fine-tuning")
        self.progress_bar.max = job.steps
        self.progress_bar.value = 0
        self.progress_bar.visible = True
        self.start_button.enabled, self.cancel.enabled = False, True
        self._set_status(
            f"Fine-tuning {job.base_name} on slices {format_slice_list(job.slices) or '(none)'}: "
            "loading..."
        )
        self._started_workers.add(worker)
        worker.start()
        self._timer.start()

    def cancel_run(self, *_: object) -> None:
        if self._worker is not None:
            self._stop.set()
            self._set_status("Cancelling after the current step...")

    def _poll(self) -> None:
        """The worker's newest step: napari's progress, the bar and the loss read-out."""
        last = None
        while True:
            try:
                last = self._steps.get_nowait()
            except queue.Empty:
                break
        if last is None or self._closed or self._job is None:
            return
        step, loss = last
        if self._progress is not None:
            self._progress.update(step - self._done)
        self._done = step
        self.progress_bar.value = step
        if not self._stop.is_set():
            seconds = time.monotonic() - self._started
            self._set_status(
                f"Step {step} of {self._job.steps}: loss <b>{loss:.4f}</b> ({seconds:.0f} s)"
            )

    def _on_returned(self, outcome: AdaptOutcome | Refused | None) -> None:
        if self._closed:
            return
        self._poll()
        if isinstance(outcome, Refused):
            self._refused(outcome.message)
            return
        if outcome is None:
            self._set_status("Cancelled: nothing was saved; the weights are unchanged.")
            show_info("APFormer: fine-tuning cancelled; nothing was saved")
            return
        host = self.host
        host.weights_choice.reset_choices()
        names = {path: name for name, path in available_weights().items()}
        self._adapted = names.get(outcome.path, outcome.name)
        host.weights_choice.value = self._adapted  # loads them; the slice reruns
        host._request_live(force=True)
        self._set_status(
            f"{dice_text(outcome.report)}<br>Saved as <b>{self._adapted}</b> in "
            f"{shown_path(outcome.path.parent)} and selected."
        )
        show_info(f"APFormer: fine-tuned weights '{self._adapted}' saved and selected")
        self._show_buttons()

    def _refused(self, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else message_text(error)
        self._set_status(f"Not fine-tuned: {text}")
        show_error(f"APFormer: {text}")

    def _on_error(self, error: BaseException) -> None:
        if self._closed:
            return
        if isinstance(error, InputError):
            self._refused(error)
        elif isinstance(error, MemoryError):
            self._refused(InputError("not enough memory to fine-tune; close other layers"))
        else:
            log.exception("APFormer fine-tuning failed", exc_info=error)
            self._set_status(f"Not fine-tuned: unexpected error ({type(error).__name__})")
            show_error(f"APFormer: unexpected error ({type(error).__name__}: {error})")

    def _on_finished(self) -> None:
        self._worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._closed:
            return
        self._timer.stop()
        self.progress_bar.visible = False
        self.start_button.enabled, self.cancel.enabled = True, False
        self._show_buttons()

    def back_to_base(self, *_: object) -> None:
        """Select the weights the last fine-tuning started from."""
        if self._base is None or self._closed:
            return
        choice, file = self._base
        host = self.host
        if choice not in available_weights():  # "other file..."
            host.weights_file.value = file
        host.weights_choice.value = choice
        host._request_live(force=True)
        self._show_buttons()

    def _show_buttons(self, *_: object) -> None:
        if self._closed:
            return
        self.undo.enabled = (
            self._base is not None
            and self._adapted is not None
            and self.host.weights_choice.value == self._adapted
        )

    def shutdown(self) -> None:
        """The widget closes: stop the run at its next step; no Qt object touched."""
        self._closed = True
        self._stop.set()
        if _qt_alive(self._timer):
            self._timer.stop()
        self.viewer.layers.events.inserted.disconnect(self._on_layer_inserted)
        for ref, _ in list(self._edits.values()):
            layer = ref()
            if layer is not None:
                layer.events.paint.disconnect(self._on_paint)
                layer.events.data.disconnect(self._on_data)
        self._edits.clear()


def new_weights_path(base: str, image: str) -> Path:
    """<user weights folder>/<base>-<image>[-N].safetensors, a name not taken yet."""
    folder = user_weights_dir()
    stem = slug(f"{base}-{image}")[:MAX_NAME]
    taken = set(user_weights())
    name, n = stem, 2
    while (
        name in taken
        or (folder / f"{name}.safetensors").exists()
        or (folder / f"{name}.json").exists()
    ):
        name, n = f"{stem}-{n}", n + 1
    return folder / f"{name}.safetensors"


def unwrapped(layer):
    """The layer itself: napari hands a plugin's widget its viewer behind a proxy
    (`PublicOnlyProxy`), whose layers are proxies too, never identical to the layer."""
    return getattr(layer, "__wrapped__", layer)


def _qt_alive(obj: object) -> bool:
    try:
        obj.objectName()  # type: ignore[attr-defined]
    except RuntimeError:
        return False
    return True
