"""The "Evaluate against a reference" dock widget: a prediction Labels layer against a
reference Labels layer, per class Dice, volume difference (ml), HD95 (mm) and surface Dice at
a tolerance, as a table and a CSV.

The numbers come from `napari_apformer.evaluate` (what `apformer evaluate` uses), on the
layers' arrays with the layers' scale as voxel spacing: a prediction and reference opened
from files give the command's numbers (the arrays are the files' voxels, transposed; the
measures do not depend on the axis order). The work runs in a worker thread, one class at a
time, so the viewer stays responsive on a volume; closing the panel stops it between classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton, Table
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QStyledItemDelegate

from napari_apformer.errors import InputError
from napari_apformer.plugin.layer_metadata import class_table_of

DEFAULT_TOLERANCE_MM = 2.0  # as `apformer evaluate`
GRID_TOLERANCE = 1e-3  # layers whose placement differs by more than this: other grids
MM_UNITS = ("millimeter", "mm")


@dataclass
class Request:
    """What one evaluation works on: copies of the two layers' arrays, taken when it starts."""

    prediction_name: str
    reference_name: str
    prediction: np.ndarray
    reference: np.ndarray
    spacing: tuple[float, ...]
    unit: str  # of the spacing: "mm", or the layers' own unit (volumes then unknown)
    tolerance: float
    names: dict[int, str]

    @property
    def voxel_ml(self) -> float | None:
        if self.unit != "mm":
            return None
        return math.prod(abs(s) for s in self.spacing) / 1000


def labels_layers(viewer) -> list[tuple[str, object]]:
    """The viewer's Labels layers, as (name, layer) choices."""
    return [(layer.name, layer) for layer in viewer.layers if _is_labels(layer)]


def _is_labels(layer) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels)


def class_names(*layers) -> dict[int, str]:
    """Class value -> name from the first layer with a class table (the prediction's first,
    as `apformer evaluate` takes the prediction's sidecar first)."""
    for layer in layers:
        table = class_table_of(getattr(layer, "features", None), layer.metadata)
        if table:
            return {int(c["value"]): str(c["name"]) for c in table}
    return {}


def request_for(prediction, reference, tolerance: float) -> Request:
    """The evaluation of two layers; InputError (naming both) when they cannot be compared."""
    where = f"'{prediction.name}' against '{reference.name}'"
    if prediction is reference:
        raise InputError("choose two different layers: a prediction and a reference", where)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise InputError(f"the tolerance is a distance of 0 mm or more, not {tolerance}", where)
    shapes = (tuple(prediction.data.shape), tuple(reference.data.shape))
    if shapes[0] != shapes[1]:
        raise InputError(
            f"the layers differ in shape: prediction {shapes[0]}, reference {shapes[1]}; "
            "both must be on one voxel grid",
            where,
        )
    if len(shapes[0]) not in (2, 3):
        raise InputError(f"2D or 3D labels are evaluated, not {len(shapes[0])}D", where)
    for what in ("scale", "translate"):
        a = np.asarray(getattr(prediction, what), float)
        b = np.asarray(getattr(reference, what), float)
        if not np.allclose(a, b, rtol=1e-6, atol=GRID_TOLERANCE):
            raise InputError(
                f"the layers are not on one grid: {what} {tuple(a)} and {tuple(b)}", where
            )
    units = {str(u) for u in reference.units}
    unit = "mm" if units <= set(MM_UNITS) else ", ".join(sorted(units))
    return Request(
        prediction.name,
        reference.name,
        np.array(prediction.data),  # copies: painting meanwhile does not change the result
        np.array(reference.data),
        tuple(float(s) for s in reference.scale),
        unit,
        float(tolerance),
        class_names(prediction, reference),
    )


def evaluate_request(request: Request):
    """The worker: yields (scores so far, classes in all) after each class; returns the rows
    (napari_apformer.evaluate's CSV rows)."""
    from napari_apformer.evaluate import iter_class_scores

    rows: list[dict] = []
    scores = iter_class_scores(
        request.reference,
        request.prediction,
        request.spacing,
        request.tolerance,
        request.names,
        request.voxel_ml,
    )
    for score, total in scores:
        rows.append(score.row(request.reference_name, request.prediction_name, request.tolerance))
        yield len(rows), total
    return rows


def table_value(rows: list[dict], unit: str) -> dict:
    """The panel's table: one row per class, headed by its value and name."""
    headers = [
        "Dice",
        "volume difference (ml)" if unit == "mm" else "volume difference",
        f"HD95 ({unit})",
        "surface Dice",
    ]
    data = [
        [
            _cell(row["dice"], 4),
            _cell(row["volume_difference_ml"], 3),
            _cell(row["hd95_mm"], 2),
            _cell(row["surface_dice"], 4),
        ]
        for row in rows
    ]
    index = [f"{row['value']} {row['class']}" for row in rows]
    return {"data": data, "index": index, "columns": headers}


def _cell(value: object, digits: int) -> str:
    if value == "" or value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:+.{digits}f}" if digits == 3 else f"{value:.{digits}f}"
    return str(value)


class EvaluatePanel(Container):
    """Plugins > APFormer > Evaluate against a reference."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self._worker = None
        self._closed = False
        self.rows: list[dict] = []
        self.request: Request | None = None
        self.prediction = ComboBox(
            label="prediction",
            choices=self._choices,
            tooltip="the Labels layer to score (e.g. the APFormer segmentation)",
        )
        self.reference = ComboBox(
            label="reference",
            choices=self._choices,
            tooltip="the Labels layer to score against, on the same voxel grid",
        )
        self.tolerance = FloatSpinBox(
            label="tolerance (mm)",
            value=DEFAULT_TOLERANCE_MM,
            min=0.0,
            max=1000.0,
            step=0.5,
            tooltip="surface Dice counts boundary voxels within this distance of the other "
            "boundary (Nikolov et al. 2021); distances use the layers' scale as voxel size",
        )
        self.evaluate_button = PushButton(text="Evaluate")
        self.status = Label(value="")
        self.table = Table(value={"data": [], "columns": table_value([], "mm")["columns"]})
        self.table.read_only = True
        # Cells as formatted here (magicgui's delegate would show every number with 4
        # decimals and drop the sign of a volume difference).
        self.table.native.setItemDelegate(QStyledItemDelegate(self.table.native))
        self.save_button = PushButton(text="Save CSV...", enabled=False)
        self.extend(
            [
                self.prediction,
                self.reference,
                self.tolerance,
                self.evaluate_button,
                self.status,
                self.table,
                self.save_button,
            ]
        )
        self.table.min_height = 160
        self.evaluate_button.clicked.connect(self.evaluate)
        self.save_button.clicked.connect(self._ask_csv_path)
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.native.destroyed.connect(self._shutdown)
        self._on_layers_changed()

    @property
    def busy(self) -> bool:
        return self._worker is not None

    # ----------------------------------------------------------------------------- choices
    def _choices(self, *_: object) -> list[tuple[str, object]]:
        return [] if self._closed else labels_layers(self.viewer)

    def _on_layers_changed(self, *_: object) -> None:
        if self._closed:
            return
        self.prediction.reset_choices()
        self.reference.reset_choices()
        choices = [layer for _, layer in self._choices()]
        if not choices:
            return
        if self.prediction.value is None or self.prediction.value is self.reference.value:
            made = [c for c in choices if c.name.endswith("segmentation")]
            self.prediction.value = (made or choices)[-1]
        if self.reference.value is None or self.reference.value is self.prediction.value:
            named = [c for c in choices if "reference" in c.name.lower()]
            others = [c for c in choices if c is not self.prediction.value]
            if named or others:
                self.reference.value = (named or others)[0]

    # ----------------------------------------------------------------------------- evaluate
    def evaluate(self) -> None:
        """Start the evaluation of the chosen layers in a worker (one at a time)."""
        if self._worker is not None:
            return
        prediction, reference = self.prediction.value, self.reference.value
        if prediction is None or reference is None:
            self._report("choose a prediction and a reference Labels layer")
            return
        try:
            request = request_for(prediction, reference, float(self.tolerance.value))
        except InputError as error:
            self._report(str(error))
            return
        self.request = request
        self.status.value = f"evaluating {request.prediction_name} ..."
        self.evaluate_button.enabled = False
        worker = create_worker(evaluate_request, request, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def _on_progress(self, progress: tuple[int, int]) -> None:
        if not self._closed:
            self.status.value = f"class {progress[0]} of {progress[1]} done"

    def _on_result(self, rows: list[dict]) -> None:
        if self._closed or self.request is None:
            return
        self.rows = rows
        self.table.value = table_value(rows, self.request.unit)
        self.table.native.resizeColumnsToContents()
        request = self.request
        note = "" if request.unit == "mm" else f"; spacing in {request.unit}, volumes not known"
        self.status.value = (
            f"{request.prediction_name} against {request.reference_name}: {len(rows)} "
            f"class(es), surface Dice at {request.tolerance:g} {request.unit}{note}"
        )
        self.save_button.enabled = bool(rows)

    def _on_error(self, error: BaseException) -> None:
        if self._closed:
            return
        if isinstance(error, InputError):
            self._report(str(error))
        elif isinstance(error, MemoryError):
            self._report("not enough memory to evaluate these layers")
        else:
            self._report(f"evaluation failed ({type(error).__name__}: {error})")

    def _on_finished(self) -> None:
        self._worker = None
        if not self._closed:
            self.evaluate_button.enabled = True

    def _report(self, message: str) -> None:
        self.status.value = message
        show_error(f"Evaluate: {message}")

    # ----------------------------------------------------------------------------- CSV
    def _ask_csv_path(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        default = f"{self.request.prediction_name if self.request else 'evaluation'}.csv"
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save the evaluation as CSV", default, "CSV (*.csv)"
        )
        if path:
            self.save_csv(Path(path))

    def save_csv(self, path: Path) -> Path | None:
        """The last result as CSV (the columns of `apformer evaluate -o`); the path written,
        or None (with a message) when it cannot be written."""
        from napari_apformer.evaluate import csv_text
        from napari_apformer.io.files import write_atomically

        if not self.rows:
            self._report("nothing to save yet: evaluate first")
            return None
        if path.suffix.lower() != ".csv":
            path = path.with_name(path.name + ".csv")
            if path.exists():  # the dialog confirmed the name without .csv only
                self._report(f"{path.name} already exists; give its whole name to replace it")
                return None
        text = csv_text(self.rows)
        try:
            write_atomically(path, lambda tmp: tmp.write_text(text, "utf-8"))
        except OSError as error:
            self._report(f"cannot write {path} ({error.strerror or error})")
            return None
        show_info(f"Evaluate: {len(self.rows)} rows written to {path}")
        return path

    # ----------------------------------------------------------------------------- close
    def _shutdown(self, *_: object) -> None:
        """The panel is closing: stop the worker between classes, touch no Qt object again."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.quit()
        self.viewer.layers.events.inserted.disconnect(self._on_layers_changed)
        self.viewer.layers.events.removed.disconnect(self._on_layers_changed)
