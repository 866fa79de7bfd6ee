"""File > Open Sample > APFormer: images shipped in napari_apformer/samples (notices there)."""

from __future__ import annotations

from pathlib import Path

from napari_apformer.plugin._reader import LayerData, layer_data, read_file

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def brain_slice() -> list[LayerData]:
    """One axial T1 slice of the MNI152 template (1 mm)."""
    return [_open("mni152_t1_axial_slice.nii.gz")]


def brain_volume() -> list[LayerData]:
    """The MNI152 T1 at 2 mm with its tissue labels (CSF, grey and white matter). The
    reference labels open hidden (tick their eye in the layer list to compare): shown, they
    would cover the image and the widget's own layers."""
    data, kwargs, kind = _open("mni152_t1_2mm_tissue_labels.nii.gz")
    kwargs["name"] = f"{kwargs['name']} (reference)"
    kwargs["visible"] = False
    return [_open("mni152_t1_2mm.nii.gz"), (data, kwargs, kind)]


def retina() -> list[LayerData]:
    """A colour fundus photograph of a healthy retina (not brain MRI)."""
    return [_open("retina_fundus.jpg")]


def _open(name: str) -> LayerData:
    return layer_data(read_file(SAMPLES / name))
