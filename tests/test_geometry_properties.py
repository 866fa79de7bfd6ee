"""Property tests (hypothesis): for any axis-aligned orientation, spacing, origin and shape,
reading, reorienting, segmenting (a stand-in that thresholds), writing and reloading puts every
label on the world coordinates of the voxel it came from, through the core and through napari's
display placement."""

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_apformer.io.display import display_array, nifti_from_display, placement
from napari_apformer.io.nifti import read_nifti, write_nifti_labels

THRESHOLD = 0.5


@st.composite
def nifti_geometry(draw):
    order = draw(st.permutations([0, 1, 2]))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    spacing = draw(st.lists(st.floats(0.25, 5.0), min_size=3, max_size=3))
    origin = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    shape = tuple(draw(st.lists(st.integers(2, 9), min_size=3, max_size=3)))
    affine = np.eye(4)
    affine[:3, :3] = 0
    for voxel_axis, world_axis in enumerate(order):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * spacing[voxel_axis]
    affine[:3, 3] = origin
    seed = draw(st.integers(0, 2**31 - 1))
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    return affine, data


def world_of(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return (affine[:3, :3] @ voxels.T).T + affine[:3, 3]


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(nifti_geometry(), st.booleans())
def test_labels_land_on_the_world_coordinates_they_came_from(geometry, through_napari):
    affine, data = geometry
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "image.nii.gz", Path(folder) / "image_seg.nii.gz"
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, 1)
        image.set_sform(affine, 1)
        nib.save(image, source)

        read = read_nifti(source)
        if through_napari:  # what the widget does: segment the displayed array, write back
            labels = nifti_from_display((display_array(read) > THRESHOLD).astype(np.uint8))
        else:
            labels = (read.data > THRESHOLD).astype(np.uint8)
        write_nifti_labels(target, labels, read.nifti, read.spacing)

        written = nib.load(target)
        out = np.asarray(written.dataobj)
        voxels = np.indices(data.shape).reshape(3, -1).T
        world = world_of(affine, voxels)
        found = np.linalg.solve(written.affine, np.c_[world, np.ones(len(world))].T).T[:, :3]
        found = np.rint(found).astype(int)
        assert np.allclose(world_of(written.affine, found), world, atol=1e-4)
        expected = (data > THRESHOLD).ravel()
        assert np.array_equal(out[tuple(found.T)].astype(bool), expected)


@settings(max_examples=40, deadline=None)
@given(nifti_geometry())
def test_napari_shows_each_voxel_at_its_scanner_position(geometry):
    affine, data = geometry
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "image.nii"
        nib.save(nib.Nifti1Image(data, affine), source)
        read = read_nifti(source)
        shown, where = display_array(read), placement(read)
        indices = np.indices(shown.shape).reshape(3, -1).T  # (z, y, x) display indices
        world_zyx = np.asarray(where.translate) + indices * np.asarray(where.scale)
        ras = world_zyx[:, ::-1]
        voxels = np.linalg.solve(affine, np.c_[ras, np.ones(len(ras))].T).T[:, :3]
        voxels = np.rint(voxels).astype(int)
        assert np.allclose(world_of(affine, voxels), ras, atol=1e-4)
        assert np.array_equal(data[tuple(voxels.T)], shown.reshape(-1))
