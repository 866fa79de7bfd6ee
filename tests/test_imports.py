"""The package and its file I/O import without torch or Qt (napari start-up stays cheap)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_package_io_and_cli_do_not_import_torch_or_qt():
    code = (
        "import sys, napari_apformer, napari_apformer.io.formats, napari_apformer.cli, "
        "napari_apformer.weights; heavy = [m for m in ('torch', 'PyQt6', 'qtpy', 'napari') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_napari_start_up_modules_do_not_import_torch():
    """What napari loads at start-up and to open files: the manifest's reader, writer and
    sample commands. Only the widget imports torch (when it opens)."""
    code = (
        "import sys, napari_apformer.plugin._reader, napari_apformer.plugin._writer, "
        "napari_apformer.plugin._sample_data as s; s.brain_slice(); "
        "print('torch' in sys.modules); sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_manifest_is_valid_and_found():
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_distribution("napari-apformer")
    assert manifest.name == "napari-apformer"
    PluginManager.instance().discover()
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {
        "APFormer",
        "Evaluate against a reference",
    }
    assert len(contributions.sample_data) == 3 and len(contributions.writers) == 9
    widget_settings = contributions.configurations["widget"].properties  # settings_store
    assert set(widget_settings) == {"weights", "weights_file", "device", "run_settings"}
    map_writers = [w for w in contributions.writers if w.layer_types == ["image"]]
    assert sorted(e for w in map_writers for e in w.filename_extensions) == [
        ".mha",
        ".nii",
        ".nii.gz",
        ".nrrd",
    ]
