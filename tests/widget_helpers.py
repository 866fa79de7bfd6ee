"""What the GUI tests share: docking the widget, waiting for its runs, finding its layers."""

from __future__ import annotations

from pathlib import Path

PLUGIN = "napari-apformer"
TIMEOUT_MS = 120_000


def open_widget(viewer, qtbot, weights: Path | None = None):
    """Dock the widget (with the shipped default weights, as `apformer predict` uses without
    --weights, or `weights`) and wait until it is idle."""
    from napari_apformer.plugin import widget as widget_module

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
