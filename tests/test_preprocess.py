"""Input checks, normalisation and the letterbox that maps slices to 256 x 256 and back."""

import numpy as np
import pytest
import torch

from napari_apformer.engine.preprocess import Letterbox, prepare_image
from napari_apformer.errors import InputError
from napari_apformer.model.base import InputRule
from napari_apformer.model.card import Normalisation

PERCENTILE = Normalisation()


def prepare(data, **kwargs):
    kwargs.setdefault("in_channels", 1)
    kwargs.setdefault("rule", InputRule(size=256))
    return prepare_image(data, normalisation=PERCENTILE, source="scan.nii", **kwargs)


@pytest.mark.parametrize(
    "shape, spacing, inner",
    [
        ((256, 256), (1, 1), (256, 256)),
        ((512, 256), (1, 1), (256, 128)),
        ((100, 300), (1, 1), (85, 256)),
        ((100, 100), (3.0, 1.0), (256, 85)),
        ((8, 8), (1, 1), (256, 256)),
    ],
)
def test_letterbox_keeps_physical_aspect_ratio(shape, spacing, inner):
    box = Letterbox.fit(*shape, spacing)
    assert (box.inner_height, box.inner_width) == inner
    assert box.top == (256 - inner[0]) // 2 and box.left == (256 - inner[1]) // 2


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (64, 90), (513, 255)])
def test_letterbox_round_trip_returns_to_the_same_pixels(shape):
    """A map that is constant on coarse blocks of the image comes back on the same pixels."""
    box = Letterbox.fit(*shape)
    y, x = np.mgrid[: shape[0], : shape[1]]
    image = ((y // 32 + x // 32) % 2).astype(np.float32)
    there = box.to_model(torch.from_numpy(image)[None, None])
    assert there.shape == (1, 1, 256, 256)
    back = box.to_image(there)[0, 0].numpy()
    assert back.shape == shape
    interior = np.abs(back - image) < 0.5
    assert interior.mean() > 0.97  # only pixels next to a block edge may blur across


@pytest.mark.parametrize("rule, stride", [(InputRule(size=256), 8), (InputRule(multiple=16), 16)])
def test_grid_placement_agrees_with_nearest_lookup(rule, stride):
    box = Letterbox.fit(300, 150, rule=rule)
    rows, cols = box.grid_shape(stride)
    grid = np.arange(rows * cols).reshape(rows, cols)
    image = box.grid_to_image(grid, stride)
    assert image.shape == (300, 150)
    (sy, sx), (ty, tx) = box.grid_scale(stride), box.grid_translate(stride)
    for y, x in [(0, 0), (150, 75), (299, 149), (37, 101)]:
        row, col = round((y - ty) / sy), round((x - tx) / sx)
        assert image[y, x] == grid[row, col] == grid.ravel()[box.grid_index(y, x, stride)]


def test_a_multiple_rule_keeps_the_pixels_and_pads_to_the_multiple():
    box = Letterbox.fit(300, 150, rule=InputRule(multiple=16))
    assert (box.inner_height, box.inner_width) == (300, 150)
    assert (box.model_height, box.model_width) == (304, 160)
    x = torch.rand(1, 1, 300, 150)
    assert torch.equal(box.to_image(box.to_model(x)), x)


def test_percentile_normalisation_and_constant_images():
    data = np.linspace(-1000, 3000, 64 * 64, dtype=np.float32).reshape(64, 64)
    prepared = prepare(data)
    pixels = prepared.slice_input(0)
    assert pixels.shape == (1, 64, 64) and pixels.min() == 0.0 and pixels.max() == 1.0
    assert prepare(np.full((32, 32), 7, np.int16)).slice_input(0).max() == 0.0


def test_volume_slices_along_the_chosen_axis():
    volume = np.random.default_rng(0).random((10, 20, 30)).astype(np.float32)
    for axis, (n, shape) in {0: (10, (20, 30)), 1: (20, (10, 30)), 2: (30, (10, 20))}.items():
        prepared = prepare(volume, axis=axis)
        assert prepared.n_slices == n and prepared.slice_input(3).shape == (1, *shape)


def test_colour_images():
    rgb = np.zeros((40, 50, 4), np.uint8)
    rgb[..., 0], rgb[..., 3] = 255, 128  # red, half transparent
    grey = prepare(rgb, rgb=True).slice_input(0)
    assert grey.shape == (1, 40, 50)
    colour = prepare(rgb, rgb=True, in_channels=3).slice_input(0)
    assert colour.shape == (3, 40, 50)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((0, 10)), "empty"),
        (np.zeros((4, 300)), "too small"),
        (np.zeros((2, 3, 16, 16)), "4D"),
        (np.zeros((16,)), "1D"),
        (np.array([[np.nan] * 16] * 16), "not finite"),
        (np.full((16, 16), np.inf, np.float32), "not finite"),
        (np.zeros((16, 16), np.complex64), "pixel type"),
    ],
)
def test_bad_inputs_get_clear_messages(data, message):
    with pytest.raises(InputError, match=message) as error:
        prepare(data)
    assert str(error.value).startswith("scan.nii: ")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("shape", [(20, 20), (3, 20, 20)])
def test_the_users_array_is_never_modified(dtype, shape):
    data = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    original = data.copy()
    prepared = prepare(data, axis=0)
    for i in range(prepared.n_slices):
        prepared.slice_input(i)
    assert np.array_equal(data, original)


def test_a_grey_slice_for_a_three_channel_model_is_repeated():
    data = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    image = prepare(data, in_channels=3)
    pixels = image.slice_input(0)
    assert pixels.shape == (3, 64, 48)
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    assert np.array_equal(pixels[0], prepare(data, in_channels=1).slice_input(0)[0])
    with pytest.raises(InputError, match="expect 2 channels"):
        prepare(data, in_channels=2)
