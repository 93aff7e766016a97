"""lrp_kernels.compat.zennit.image: round trips through PIL images and files, normalisation and
grid layout derived here."""
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_kernels.compat.zennit.cmap import ColorMap
from lrp_kernels.compat.zennit.image import CMAPS, get_cmap, gridify, imgify, imsave, interval_norm_bounds, palette


def test_uint8_rgb_round_trip_any_channel_position():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    for layout in (rgb, rgb.transpose(2, 0, 1)):
        image = imgify(layout)
        assert image.mode == "RGB" and image.size == (7, 5)
        assert np.array_equal(np.asarray(image), rgb)


def test_uint8_gray_round_trip_through_the_palette():
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    image = imgify(indices, cmap="hot")
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), indices)  # uint8 is not renormalised
    assert np.array_equal(np.asarray(image.convert("RGB")), palette("hot")[indices])


@pytest.mark.parametrize("symmetric", [False, True])
def test_float_normalisation(symmetric):
    x = np.array([[-2.0, -0.5, 0.0], [0.25, 1.0, 3.0]])
    m = np.abs(x).max()
    low, high = (-m, m) if symmetric else (x.min(), x.max())
    expected = np.floor((x - low) / (high - low) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(imgify(x, symmetric=symmetric)), expected)
    # given bounds win; values outside are clipped
    expected = np.floor(np.clip((x - 0.0) / 1.0, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(imgify(x, vmin=0.0, vmax=1.0, symmetric=symmetric)), expected)


def test_tensor_input_with_grad():
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
    assert np.array_equal(np.asarray(imgify(x)), np.asarray(imgify(x.detach().numpy())))


def test_constant_image_goes_to_the_centre_and_nan_is_an_error():
    assert (np.asarray(imgify(np.zeros((2, 2)), symmetric=True)) == 127).all()
    with pytest.raises(ValueError, match="NaN"):
        imgify(np.array([[0.0, np.nan]]))


def test_grid_normalises_each_sample_and_tiles():
    # five 2 x 3 samples, each a different linear ramp: per-sample normalisation makes every
    # tile the same 0..255 ramp; default layout: cols = floor(sqrt(5)) = 2, rows = 3
    ramp = np.arange(6, dtype=np.float64).reshape(2, 3)
    batch = np.stack([ramp * (k + 1) - k for k in range(5)])
    tile = np.floor((ramp - ramp.min()) / (ramp.max() - ramp.min()) * 255).astype(np.uint8)
    image = np.asarray(imgify(batch, grid=True, gridfill=7))
    assert image.shape == (3 * 2, 2 * 3)
    for k in range(5):
        r, c = divmod(k, 2)
        assert np.array_equal(image[r * 2:(r + 1) * 2, c * 3:(c + 1) * 3], tile)
    assert (image[4:6, 3:6] == 7).all()  # the empty sixth cell


def test_gridify_layout_channels_and_fill():
    batch = np.arange(4 * 3 * 2 * 2, dtype=np.float64).reshape(4, 3, 2, 2)  # channels first
    grid = gridify(batch, shape=(1, 3))  # one row of three; the fourth image is left out
    assert grid.shape == (2, 6, 3)
    for k in range(3):
        assert np.array_equal(grid[:, 2 * k:2 * k + 2], batch[k].transpose(1, 2, 0))
    filled = gridify(batch[:1], shape=(1, 2))
    assert np.array_equal(filled[:, 2:], np.broadcast_to(batch[0].min(axis=(1, 2)), (2, 2, 3)))
    with pytest.raises(TypeError):
        gridify(np.zeros((2, 2, 2, 2)))  # 2 channels


@pytest.mark.parametrize("grid", [1, (2,), (1, 1, 1), (1.0, 1.0)])
def test_bad_grid_is_a_type_error(grid):
    with pytest.raises(TypeError, match="grid"):
        imgify(np.zeros((1, 2, 2)), grid=grid)


def test_imsave_round_trip():
    x = np.linspace(-1, 1, 20).reshape(4, 5)
    buffer = BytesIO()
    imsave(buffer, x, cmap="coldnhot", symmetric=True, format="png")
    buffer.seek(0)
    loaded = Image.open(buffer)
    expected = imgify(x, cmap="coldnhot", symmetric=True)
    assert loaded.mode == "P"
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_interval_norm_bounds_per_sample_by_default():
    x = np.array([[[1.0, -3.0]], [[2.0, 0.5]]])
    low, high = interval_norm_bounds(x)
    assert low.ravel().tolist() == [-3.0, 0.5] and high.ravel().tolist() == [1.0, 2.0]
    low, high = interval_norm_bounds(x, symmetric=True, dim=(0, 1, 2))
    assert low.shape == (1, 1, 1) and low.item() == -3.0 and high.item() == 3.0


def test_get_cmap():
    cmap = ColorMap("000,fff")
    assert get_cmap(cmap) is cmap
    assert get_cmap("bwr") is CMAPS["bwr"]
    assert get_cmap("00f,fff").source == "00f,fff"
