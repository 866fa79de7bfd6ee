"""The widget's read-out of the weights and of pruning (issues 12 and 15): the card's limits,
the parameter count and what compression kept, the labels pruning changed against an
unpruned pass, and the choices remembered from one session to the next."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

import torch  # noqa: E402

from napari_apformer.compress.budget import Budget  # noqa: E402
from napari_apformer.compress.pipeline import CompressConfig, compress  # noqa: E402
from napari_apformer.compress.search import SearchConfig  # noqa: E402
from napari_apformer.engine.inference import Segmenter  # noqa: E402
from napari_apformer.model import ModelCard, load_model, save_weights  # noqa: E402
from napari_apformer.model.base import build_model  # noqa: E402
from napari_apformer.plugin import settings_store  # noqa: E402
from napari_apformer.plugin import widget as widget_module  # noqa: E402
from napari_apformer.plugin.image_source import image_source  # noqa: E402
from napari_apformer.plugin.runs import unpruned_values  # noqa: E402
from napari_apformer.train.augment import Augmentation  # noqa: E402
from napari_apformer.train.datasets import SliceSet  # noqa: E402
from napari_apformer.weights import DEFAULT_WEIGHTS, shipped_weights  # noqa: E402
from widget_helpers import PLUGIN, open_widget, output, wait_idle  # noqa: E402

TINY = {
    "input_size": 64,
    "widths": [4, 8, 8, 16],
    "layers": [
        {"heads": 2, "dim_head": 8, "mlp": 16, "scale": 0.25},
        {"heads": 3, "dim_head": 4, "mlp": 12, "scale": 0.5},
    ],
}


def readout_lines(widget) -> list[str]:
    return widget.readout.value.split("<br>")


def line_starting(widget, start: str) -> str:
    [line] = [x for x in readout_lines(widget) if x.startswith(start)]
    return line


def random_slices(n: int, seed: int) -> SliceSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 64, 64, generator=g)
    masks = torch.randint(0, 3, (n, 64, 64), generator=g)
    return SliceSet(images, masks, [f"s{i}" for i in range(n)])


@pytest.fixture(scope="module")
def compressed_weights(tmp_path_factory) -> Path:
    """A tiny APFormer compressed by the real pipeline (2 search steps on random slices),
    keeping half of its head channels and MLP units: its card carries
    `training.compression`."""
    folder = tmp_path_factory.mktemp("compressed")
    torch.manual_seed(3)
    base = build_model("apformer", 1, 3, sizes=TINY).eval()
    save_weights(base, ModelCard.generic("tiny-base", 1, 3), folder / "tiny-base")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compress(
            load_model(folder / "tiny-base.safetensors"),
            random_slices(4, 0),
            random_slices(2, 1),
            CompressConfig(
                out=folder / "tiny-slim",
                search=SearchConfig(
                    lambdas={"head_channels": 1e-3, "mlp_hidden": 1e-3},
                    steps=2,
                    batch_size=2,
                    augmentation=Augmentation(clean_probability=1.0),
                    progress=False,
                    device="cpu",
                ),
                budget=Budget(
                    default_keep=0.5, min_keep={"head_channels": 1, "heads": 1, "mlp_hidden": 1}
                ),
                base_name="tiny-base",
            ),
        )
    finally:
        torch.set_num_threads(before)
    return folder / "tiny-slim.safetensors"


# ------------------------------------------------------------------------ texts, no viewer
def test_card_about_shows_what_the_weights_are_made_and_not_made_for():
    card = ModelCard.generic("w", 1, 2)
    card.description = "Brain <tissue> in T1 MRI, e.g. MPRAGE. Trained on one brain."
    card.limits = ["T1 only: CT was never tried", "children & lesions never seen"]
    about = widget_module.card_about(card)
    # The description's first sentence; the tooltip has all of it.
    assert about.startswith("<b>Made for:</b> Brain &lt;tissue&gt; in T1 MRI, e.g. MPRAGE.<br>")
    assert widget_module.card_details(card).startswith(card.description + "\n\n")
    # Each limit up to its colon; the tooltip has them in full.
    assert about.endswith(
        "<b>Not made for:</b><br>&bull; T1 only<br>&bull; children &amp; lesions never seen"
    )
    details = widget_module.card_details(card)
    assert details.endswith(
        "Not made for:\n- T1 only: CT was never tried\n- children & lesions never seen"
    )
    card.limits = []
    assert "Not made for" not in widget_module.card_about(card)


def test_the_shipped_card_limits_are_in_the_about_text():
    path = shipped_weights()[DEFAULT_WEIGHTS]
    card = ModelCard.read(path.with_suffix(".json"))
    assert card.limits
    about = widget_module.card_about(card)
    details = widget_module.card_details(card)
    for limit in card.limits:
        head = limit.split(":")[0]
        assert head and f"&bull; {widget_module.html.escape(head)}<" in f"{about}<"
        assert f"- {limit}" in details


def test_model_size_text_of_plain_and_compressed_weights(compressed_weights):
    card = ModelCard.read(compressed_weights.with_suffix(".json"))
    compression = card.training["compression"]
    model = load_model(compressed_weights)
    params = sum(p.numel() for p in model.parameters())
    base = compression["base_params"]
    assert params < base
    text = widget_module.model_size_text(card, params)
    per_layer = [layer["kept_head_channels"] for layer in compression["layers"]]
    mlp = [layer["kept_mlp_hidden"] for layer in compression["layers"]]
    heads = [layer["kept_heads"] for layer in compression["layers"]]
    assert text == (
        f"compressed from tiny-base: {params / 1e3:.1f} k of {base / 1e3:.1f} k parameters "
        f"({100 * params / base:.1f} %); kept per layer: "
        f"head channels {', '.join(map(str, per_layer))}; "
        f"whole attention heads {', '.join(map(str, heads))}; "
        f"MLP hidden units {', '.join(map(str, mlp))}"
    )
    # The widths in the text are the network's own.
    layers = card.architecture["sizes"]["layers"]
    assert per_layer == [layer["dim_head"] for layer in layers]
    assert mlp == [layer["mlp"] for layer in layers]
    plain = ModelCard.generic("plain", 1, 3)
    assert widget_module.model_size_text(plain, 2_639_274) == "model: 2.64 M parameters"
    assert widget_module.model_size_text(plain, 812) == "model: 812 parameters"
    broken = ModelCard.generic("broken", 1, 3)
    broken.training = {"compression": {"base_params": 100, "layers": "?", "dimensions": {}}}
    assert widget_module.model_size_text(broken, 80) == (
        "compressed from its base weights: 80 of 100 parameters (80.0 %)"
    )


def test_the_weights_list_offers_every_safetensors_in_the_weights_folder(tmp_path, monkeypatch):
    from napari_apformer import weights

    for name in ("a", "mni152-tissue-slim"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    monkeypatch.setattr(weights, "weights_dir", lambda: tmp_path)
    assert list(weights.available_weights()) == ["a", "mni152-tissue-slim"]


def test_a_family_without_pruning_settings_has_no_unpruned_pass():
    torch.manual_seed(0)
    assert unpruned_values(build_model("mobileutr", 1, 3).eval()) is None
    apformer = build_model("apformer", 1, 3, sizes=TINY)
    apformer.set_defaults({"token_threshold": 0.7, "gate": [1.0, -1.0]})
    assert unpruned_values(apformer) == {"token_threshold": 1.0, "gate": [1.0, -1.0]}


def napari_plugin_settings_file() -> Path:
    """Where napari keeps our plugin settings: beside its own file (NAPARI_CONFIG, conftest)."""
    return Path(os.environ["NAPARI_CONFIG"]).parent / f"{settings_store.PLUGIN}.yaml"


def reread_from_disk() -> settings_store.Remembered:
    """The choices as a new napari session reads them: napari's settings model built anew
    from the file, not the object this process holds."""
    from napari.settings import get_plugin_settings

    model = type(get_plugin_settings(settings_store.PLUGIN))
    section = model(config_path=napari_plugin_settings_file()).widget
    return settings_store.Remembered(
        section.weights or None,
        section.weights_file or None,
        section.device or None,
        settings_store.parse_run_settings(section.run_settings),
    )


def test_remembered_choices_round_trip_through_napari_settings_and_bad_text():
    assert settings_store.load() == settings_store.Remembered()
    kept = settings_store.Remembered(
        "other file...",
        "/data/w.safetensors",
        "cpu",
        {
            "/data/w.safetensors": settings_store.WeightsSettings(
                {"gate": [1.0, 2.0]}, {"gate": True}
            ),
            "mni152-tissue": settings_store.WeightsSettings({"token_threshold": 0.5}, {}),
        },
    )
    settings_store.save(kept)
    assert settings_store.load() == kept
    assert reread_from_disk() == kept  # napari wrote its file
    from napari.settings import get_plugin_settings

    section = get_plugin_settings(settings_store.PLUGIN).widget
    for bad in ("{not json", "[1, 2]", '{"w": 3}'):
        section.run_settings = bad
        assert settings_store.load().by_weights == {}
    section.run_settings = json.dumps({"w": {"settings": [], "per_layer": {"gate": 1, "x": True}}})
    expected = {"w": settings_store.WeightsSettings({}, {"x": True})}
    assert settings_store.load().by_weights == expected


# ----------------------------------------------------------------------------- in napari
def test_compressed_weights_and_changed_labels_in_the_read_out(
    viewer, qtbot, compressed_weights, notices
):
    [image] = viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, compressed_weights)
    card = ModelCard.read(compressed_weights.with_suffix(".json"))
    size = line_starting(widget, "compressed from tiny-base: ")
    params = sum(p.numel() for p in load_model(compressed_weights).parameters())
    assert size == widget_module.model_size_text(card, params)
    assert readout_lines(widget).index(size) == 5  # after the cost lines (GFLOP)
    assert "kept per layer: head channels" in size

    widget.setting_controls["token_threshold"].slider.value = 0.3  # prunes much
    wait_idle(qtbot, widget)
    outcome = widget._last
    seg = output(viewer, image, "segmentation")
    changed = output(viewer, image, "changed by pruning")
    assert not changed.visible and changed.data.shape == seg.data.shape
    # The same slice through the engine with nothing token-pruned, compared here.
    segmenter = Segmenter(load_model(compressed_weights), "cpu")
    source = image_source(image, tuple(viewer.dims.point))
    prepared = segmenter.prepare(
        source.model_data(),
        rgb=source.rgb,
        axis=source.model_axis(0),
        spacing=source.model_spacing(),
        source=image.name,
    )
    # A one-slice volume: labels on the model array's axes, shown like the widget shows them.
    reference = source.to_display(segmenter.start(prepared, token_threshold=1.0).finish().labels)
    pruned = source.to_display(segmenter.start(prepared, **outcome.settings).finish().labels)
    assert np.array_equal(seg.data, pruned)
    expected = pruned != reference
    assert expected.any()  # a threshold of 0.3 changes some labels of these weights
    assert np.array_equal(changed.data == 1, expected)
    share = 100 * expected.mean()
    assert line_starting(widget, "labels changed by pruning: ") == (
        f"labels changed by pruning: {share:.1f} % of the image's pixels (vs. token threshold 1)"
    )
    # At the unpruned settings nothing changed; the reference was not run again.
    runs = widget.session.unpruned_runs
    widget.setting_controls["token_threshold"].slider.value = 1.0
    wait_idle(qtbot, widget)
    assert not changed.data.any()
    assert (
        "labels changed by pruning: 0.0 % of the image's pixels (unpruned settings)"
        in widget.readout.value
    )
    assert widget.session.unpruned_runs == runs
    assert not [n for n in notices if "error" in n.lower()]


def test_the_unpruned_pass_runs_once_per_slice_not_per_slider_move(
    viewer, qtbot, small_apformer_weights, notices
):
    [image, _] = viewer.open_sample(PLUGIN, "mni152_volume")
    widget = open_widget(viewer, qtbot, small_apformer_weights)
    assert widget.session.unpruned_runs == 1
    for value in (0.5, 0.7):
        widget.setting_controls["token_threshold"].slider.value = value
        wait_idle(qtbot, widget)
    widget.setting_controls["gate"].slider.value = 1.0
    wait_idle(qtbot, widget)
    assert widget._last.settings["token_threshold"] == pytest.approx(0.7)
    assert widget.session.unpruned_runs == 1
    assert "(vs. token threshold 1, dependency gate " in widget.readout.value
    step = list(viewer.dims.current_step)
    step[0] += 3
    viewer.dims.current_step = tuple(step)  # another slice: its own unpruned pass
    wait_idle(qtbot, widget)
    assert widget.session.unpruned_runs == 2
    changed = output(viewer, image, "changed by pruning")
    assert changed.translate[0] == pytest.approx(
        image.translate[0] + widget._last.request.index * image.scale[0]
    )
    assert not [n for n in notices if "error" in n.lower()]


def test_settings_come_back_in_a_new_session(
    make_napari_viewer, qtbot, small_apformer_weights, notices
):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "mni152_slice")
    widget = open_widget(viewer, qtbot, small_apformer_weights)
    widget.device_choice.value = "cpu"
    widget.setting_controls["token_threshold"].slider.value = 0.55
    gate = widget.setting_controls["gate"]
    gate.per_layer.value = True
    gate.layer_sliders[2].value = 1.5
    wait_idle(qtbot, widget)
    # Other weights have their own settings; going back brings these back.
    widget.weights_choice.value = DEFAULT_WEIGHTS
    wait_idle(qtbot, widget)
    assert widget.setting_controls["token_threshold"].slider.value != pytest.approx(0.55)
    widget.setting_controls["token_threshold"].slider.value = 0.8
    wait_idle(qtbot, widget)
    widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    wait_idle(qtbot, widget)
    assert widget.setting_controls["token_threshold"].slider.value == pytest.approx(0.55)
    viewer.close()  # writes what is not written yet
    saved = reread_from_disk()
    assert saved.weights_file == str(small_apformer_weights)
    mine = saved.by_weights[str(small_apformer_weights)]
    assert mine.settings["token_threshold"] == pytest.approx(0.55)
    assert mine.per_layer["gate"] and mine.settings["gate"][2] == pytest.approx(1.5)
    assert saved.by_weights[DEFAULT_WEIGHTS].settings["token_threshold"] == pytest.approx(0.8)

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "mni152_slice")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "APFormer")
    wait_idle(qtbot, widget)
    assert widget.weights_choice.value == widget_module.OTHER_WEIGHTS
    assert Path(widget.weights_file.value) == small_apformer_weights
    assert widget.device_choice.value == "cpu"
    gate = widget.setting_controls["gate"]
    assert widget.setting_controls["token_threshold"].slider.value == pytest.approx(0.55)
    assert gate.per_layer.value and gate.layer_sliders[2].value == pytest.approx(1.5)
    # The first run of the new session used them.
    assert widget._last.settings["token_threshold"] == pytest.approx(0.55)
    assert widget._last.settings["gate"][2] == pytest.approx(1.5)
    assert not [n for n in notices if "error" in n.lower()]


def test_stale_remembered_values_fall_back_to_defaults_silently(
    viewer, qtbot, small_apformer_weights, tmp_path, notices
):
    viewer.open_sample(PLUGIN, "mni152_slice")
    settings_store.save(
        settings_store.Remembered(
            weights=widget_module.OTHER_WEIGHTS,
            weights_file=str(tmp_path / "deleted.safetensors"),
            device="cuda:7",
            by_weights={
                str(tmp_path / "deleted.safetensors"): settings_store.WeightsSettings(
                    {"token_threshold": 0.4}
                )
            },
        )
    )
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "APFormer")
    wait_idle(qtbot, widget)
    assert widget.weights_choice.value == DEFAULT_WEIGHTS
    assert widget.device_choice.value == "auto"
    default = widget._model_info.settings[0].default
    assert widget.setting_controls["token_threshold"].slider.value == pytest.approx(default)
    assert not notices
    # Under the weights: what the shipped card says they were and were not made for.
    card = widget._model_info.card
    assert widget.weights_about.value == widget_module.card_about(card)
    assert "<b>Not made for:</b>" in widget.weights_about.value
    assert widget.weights_about.tooltip == widget_module.card_details(card)
