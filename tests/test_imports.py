"""The package and its file I/O import without torch or Qt (napari start-up stays cheap)."""

import subprocess
import sys


def test_package_io_and_cli_do_not_import_torch_or_qt():
    code = (
        "import sys, napari_apformer, napari_apformer.io.formats, napari_apformer.cli, "
        "napari_apformer.weights; heavy = [m for m in ('torch', 'PyQt6', 'qtpy', 'napari') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
