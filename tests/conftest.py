from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
SAMPLE = Path(__file__).parents[1] / "src/napari_apformer/samples/mni152_t1_axial_slice.nii.gz"

torch.set_num_threads(2)


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
