import ctypes
import gc
import os
import sys
import tempfile
from pathlib import Path

# napari reads its settings at import: keep tests away from the user's settings file.
os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp(prefix="napari-test-")) / "settings.yaml")

import numpy as np
import pytest
import torch

from napari_apformer.weights import USER_WEIGHTS_ENV

DATA = Path(__file__).parent / "data"
SAMPLE = Path(__file__).parents[1] / "src/napari_apformer/samples/mni152_t1_axial_slice.nii.gz"

torch.set_num_threads(2)


def _libc_malloc_trim():
    """glibc's malloc_trim, or None (another C library or platform)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After each test's own teardown (viewers closed): collect the cycles a viewer or a
    model leaves (only after tests that made them: a collection takes about 0.2 s) and hand
    the pages glibc keeps after large frees back to the kernel, so the suite's resident
    memory stays near one test's needs instead of growing with the heaps of earlier ones."""
    yield
    if {"gui", "slow"} & set(item.keywords) or "qtbot" in item.fixturenames:
        gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@pytest.fixture(autouse=True)
def isolated_user_folders(monkeypatch, tmp_path_factory):
    """No test reads or writes the user's own files: the user weights folder (fine-tuned
    weights, `weights.USER_WEIGHTS_ENV`) points to this test's own empty temporary folder,
    which does not exist until something writes there; napari's settings, the widget's
    remembered choices among them (plugin.settings_store), sit in a temporary folder
    (`NAPARI_CONFIG` above) and go back to their defaults after each test, because napari
    keeps one plugin settings object per process."""
    folder = tmp_path_factory.mktemp("user")
    monkeypatch.setenv(USER_WEIGHTS_ENV, str(folder / "weights"))
    yield
    if "napari.settings" in sys.modules:
        from napari.settings import get_plugin_settings

        get_plugin_settings("napari-apformer").widget.reset()


@pytest.fixture(scope="session")
def official() -> dict[str, np.ndarray]:
    """The trimmed conformance vector of the authors' release (see tests/data/README.md)."""
    with np.load(DATA / "official_gray9_trimmed.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def official_state_dict(official) -> dict[str, torch.Tensor]:
    return {k[3:]: torch.from_numpy(v) for k, v in official.items() if k.startswith("sd/")}


@pytest.fixture(scope="session")
def official_model(official_state_dict):
    from napari_apformer.model import load_model

    return load_model(official_state_dict)


@pytest.fixture
def random_model():
    from napari_apformer.model import APFormer

    torch.manual_seed(0)
    return APFormer(in_channels=1, n_classes=4).eval()


@pytest.fixture(scope="session")
def official_weights(official_model, tmp_path_factory) -> Path:
    """The authors' released weights saved in our format (a trained pruning head)."""
    from napari_apformer.model import ModelCard, save_weights

    card = ModelCard.generic("official-gray9", 1, official_model.n_classes)
    path = tmp_path_factory.mktemp("weights") / "official-gray9.safetensors"
    save_weights(official_model, card, path)
    return path


@pytest.fixture(scope="session")
def small_apformer_weights(tmp_path_factory) -> Path:
    """An APFormer with today's CNN and one narrow head per layer (3 classes): training
    tests start from it with --init, so a training step needs a few hundred MB, not GBs."""
    from napari_apformer.model import ModelCard, save_weights
    from napari_apformer.model.apformer.network import APFormer

    layer = {"heads": 1, "dim_head": 16, "mlp": 32, "scale": 16**-0.5}
    sizes = {"input_size": 256, "widths": [16, 32, 64, 128], "layers": [layer] * 4}
    torch.manual_seed(0)
    model = APFormer.from_sizes(1, 3, "default", sizes)
    path = tmp_path_factory.mktemp("small") / "small-apformer.safetensors"
    save_weights(model, ModelCard.generic("small-apformer", 1, 3), path)
    return path


@pytest.fixture
def viewer(make_napari_viewer):
    """A napari viewer, closed when the test ends (make_napari_viewer needs napari)."""
    return make_napari_viewer()


@pytest.fixture
def notices(monkeypatch) -> list[str]:
    """Every message the widget shows (errors, information, warnings)."""
    from napari_apformer.plugin import widget as widget_module

    shown: list[str] = []
    for name in ("show_error", "show_info", "show_warning"):
        monkeypatch.setattr(widget_module, name, shown.append)
    return shown
