"""Save docs/unseen_brains.png: the shipped weights on brain MRI they were not trained on.

    python docs/make_unseen_check.py

Images from packages: nibabel's test data `anatomical.nii` (a T1 of a real subject, 2 mm,
LAS voxel order) and `example4d.nii.gz` (a T2*-weighted EPI, first volume, 2 x 2 x 2.2 mm).
Each row: three slices (axial, coronal, sagittal) through the middle, grey image with the
labels drawn over it. For the eye only: there is no ground truth for these images.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from napari_apformer.engine.inference import Segmenter
from napari_apformer.io.nifti import read_nifti
from napari_apformer.model import load_model
from napari_apformer.weights import resolve_weights

DATA = Path(nibabel.__file__).parent / "tests" / "data"
IMAGES = {
    "nibabel anatomical.nii (T1)": "anatomical.nii",
    "nibabel example4d (EPI)": "example4d.nii.gz",
}
OUT = Path(__file__).parent / "unseen_brains.png"


def main() -> None:
    torch.set_num_threads(2)
    segmenter = Segmenter(load_model(resolve_weights(None)), "cpu")
    colours = [c.colour for c in segmenter.card.classes]
    cmap = ListedColormap(
        [(0, 0, 0, 0)] + [matplotlib.colors.to_rgba(c, 0.45) for c in colours[1:]]
    )
    fig, axes = plt.subplots(len(IMAGES), 3, figsize=(10, 3.6 * len(IMAGES)))
    for row, (title, name) in enumerate(IMAGES.items()):
        image = read_nifti(DATA / name, allow_series=True)
        volume = image.data[..., 0] if image.series else image.data
        for col, (axis, plane) in enumerate(((2, "axial"), (1, "coronal"), (0, "sagittal"))):
            prepared = segmenter.prepare(volume, axis=axis, spacing=image.spacing, source=name)
            index = volume.shape[axis] // 2
            result = segmenter.segment(prepared, slices=[index])
            pixels = np.take(volume, index, axis=axis).T  # (other, first) -> rows up
            labels = np.take(result.labels, index, axis=axis).T
            spacing = [s for a, s in enumerate(image.spacing) if a != axis]
            extent = (0, pixels.shape[1] * spacing[0], 0, pixels.shape[0] * spacing[1])
            ax = axes[row, col]
            ax.imshow(pixels, cmap="gray", origin="lower", extent=extent)
            ax.imshow(
                labels,
                cmap=cmap,
                vmin=0,
                vmax=len(colours) - 1,
                origin="lower",
                extent=extent,
                interpolation="nearest",
            )
            ax.set_title(f"{title}\n{plane} slice {index}", fontsize=8)
            ax.axis("off")
    names = ", ".join(f"{c.name} = {c.colour}" for c in segmenter.card.classes[1:])
    fig.suptitle(f"weights {segmenter.card.name}: {names}", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT, dpi=100)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
