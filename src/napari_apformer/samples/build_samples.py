"""Rebuild the sample images shipped in this folder.

    python -m napari_apformer.samples.build_samples --template PATH/TO/nilearn-*.whl

MNI152 samples come from the ICBM152 2009 template in the nilearn wheel (notice:
NOTICE_MNI152.txt); the retina photograph from scikit-image's data (CC0, NOTICE_RETINA.txt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_apformer.train.mni152 import CLASSES, NOTICE, load_template, tissue_labels

HERE = Path(__file__).parent
AXIAL_SLICE = 90  # voxel z of the 1 mm template: through the lateral ventricles
MARGIN = 4  # voxels kept around the brain when cropping the 2 mm volume
SAMPLE_FILES = f"""Sample files in this folder made from the template:
- mni152_t1_axial_slice.nii.gz: the T1 axial slice z = {AXIAL_SLICE} (voxels unchanged, 1 mm).
- mni152_t1_2mm.nii.gz: the T1 at 2 mm (mean of 2 x 2 x 2 blocks), cropped to the head.
- mni152_t1_2mm_tissue_labels.nii.gz (+ .json class table): tissue labels on the same grid,
  from the block-mean GM and WM maps.
"""
RETINA_NOTICE = """retina_fundus.jpg: scikit-image's data.retina() resized to 512 x 512.
Source: https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg
(Mikael Haggstrom, 2014), made available under the Creative Commons CC0 1.0 Universal Public
Domain Dedication.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, help="nilearn wheel or its data folder")
    args = parser.parse_args()
    template = load_template(args.template)
    write_slice(template)
    write_volume(template)
    write_retina()
    (HERE / "NOTICE_MNI152.txt").write_text(SAMPLE_FILES + "\n" + NOTICE, "utf-8")
    (HERE / "NOTICE_RETINA.txt").write_text(RETINA_NOTICE, "utf-8")


def write_slice(template) -> None:
    z = AXIAL_SLICE
    affine = template.affine.copy()
    affine[:3, 3] += affine[:3, 2] * z
    data = template.t1[:, :, z : z + 1].round().astype(np.uint8)
    _save(data, affine, HERE / "mni152_t1_axial_slice.nii.gz")


def write_volume(template) -> None:
    """2 mm: the mean of each 2 x 2 x 2 block, labels from the block-mean probabilities."""
    t1, gm, wm = (_downsample(a) for a in (template.t1, template.gm, template.wm))
    labels = tissue_labels(t1, gm, wm)
    brain = np.argwhere(labels > 0)
    low = np.maximum(brain.min(axis=0) - MARGIN, 0)
    high = np.minimum(brain.max(axis=0) + MARGIN + 1, labels.shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    affine = template.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = template.affine[:3, 3] + 0.5 * np.diag(template.affine)[:3]  # block centres
    affine[:3, 3] += affine[:3, :3] @ low
    _save(t1[crop].round().astype(np.uint8), affine, HERE / "mni152_t1_2mm.nii.gz")
    label_path = HERE / "mni152_t1_2mm_tissue_labels.nii.gz"
    _save(labels[crop], affine, label_path, intent_label=True)
    table = {"labels": CLASSES, "source": "MNI ICBM152 2009 template; see NOTICE_MNI152.txt"}
    label_path.with_name("mni152_t1_2mm_tissue_labels.json").write_text(
        json.dumps(table, indent=2) + "\n", "utf-8"
    )


def write_retina() -> None:
    import imageio.v3 as iio
    from skimage import data, transform

    image = transform.resize(data.retina(), (512, 512), anti_aliasing=True, preserve_range=True)
    iio.imwrite(HERE / "retina_fundus.jpg", image.round().astype(np.uint8), quality=90)


def _downsample(volume: np.ndarray) -> np.ndarray:
    x, y, z = (s // 2 * 2 for s in volume.shape)
    blocks = volume[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, intent_label: bool = False) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, 4)  # MNI space
    image.set_sform(affine, 4)
    image.header.set_xyzt_units("mm")
    if intent_label:
        image.header.set_intent(1002)
    nib.save(image, str(path))


if __name__ == "__main__":
    main()
