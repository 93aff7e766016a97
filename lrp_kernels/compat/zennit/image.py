"""Zennit's image helpers: attributions (or any array) to PIL images and files.

``imgify(attribution.sum(1)[0], symmetric=True, cmap='coldnhot')`` normalises one 2-D array (or
an ``(H, W, 1|3)`` / ``(1|3, H, W)`` image) to 0..255 and makes an indexed (``'P'``) image coloured
by a colour map when it has one channel, an ``'RGB'`` image when it has three. With ``grid=True``
the first axis is a batch, each sample is normalised on its own and the samples are tiled
(:func:`gridify`). uint8 arrays are taken as they are, without normalisation.

The colour maps are :data:`CMAPS` (names) or Zennit's colour-map source text
(:mod:`lrp_kernels.compat.zennit.cmap`). Our own heatmap images
(:mod:`lrp_kernels.explanations.imaging`) share the interpolation and the grid layout with these
helpers but keep their own conventions (one diverging map, symmetric scale, white padding).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ...explanations.imaging import tile_grid
from .cmap import ColorMap, LazyColorMapCache

__all__ = ["CMAPS", "get_cmap", "palette", "imgify", "gridify", "imsave", "interval_norm_bounds"]

#: The named colour maps (Zennit's names and colours), compiled on first use.
CMAPS = LazyColorMapCache({
    "gray": "000,fff",                           # black to white
    "wred": "fff,f00",                           # white to red
    "wblue": "fff,00f",                          # white to blue
    "hot": "000,f00,ff0,fff",                    # black, red, yellow, white
    "cold": "000,00f,0ff",                       # black, blue, cyan
    "coldnhot": "0ff,00f,80:000,f00,ff0,fff",    # cold reversed, then hot: black at the centre
    "bwr": "00f,80:fff,f00",                     # blue, white at the centre, red
    "france": "0055a4,80:fff,ef4135",            # the blue, white and red of the French flag
    "seismic": "0000d0,80:d0d0d0,d00000",        # bwr at brightness 0xd0
    "coolio": "00d0d0,80:d0d0d0,d000d0",         # cyan, grey, magenta at brightness 0xd0
    "coleus": "00d000,80:d0d0d0,d000d0",         # green, grey, magenta at brightness 0xd0
})

CMapLike = Union[str, ColorMap]


def get_cmap(cmap: CMapLike) -> ColorMap:
    """``cmap`` itself if it is a :class:`ColorMap`, the map of that name in :data:`CMAPS`, or
    else a new map compiled from ``cmap`` as source text."""
    if isinstance(cmap, ColorMap):
        return cmap
    if cmap in CMAPS:
        return CMAPS[cmap]
    return ColorMap(cmap)


def palette(cmap: CMapLike = "bwr", level: float = 1.0) -> np.ndarray:
    """The 256 uint8 RGB colours ``(256, 3)`` of ``cmap`` (see :func:`get_cmap`) at ``level``
    (see :meth:`ColorMap.palette <lrp_kernels.compat.zennit.cmap.ColorMap.palette>`)."""
    return get_cmap(cmap).palette(level=level)


def _as_array(obj) -> np.ndarray:
    if hasattr(obj, "detach"):  # a torch tensor, on any device, with or without grad
        return obj.detach().cpu().numpy()
    return np.array(obj)


def interval_norm_bounds(input, symmetric: bool = False,
                         dim: Optional[Tuple[int, ...]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(vmin, vmax)`` over the axes ``dim`` (default: all but the first, i.e. per sample),
    kept as size-1 axes so they broadcast against ``input``.

    ``symmetric=False``: the minimum and the maximum. ``symmetric=True``: ``-m`` and ``m`` with
    ``m`` the largest magnitude, so that 0 lands at the centre of the colour map.
    """
    input = _as_array(input)
    if dim is None:
        dim = tuple(range(1, input.ndim))
    if symmetric:
        high = np.abs(input).max(dim, keepdims=True)
        return -high, high
    return input.min(dim, keepdims=True), input.max(dim, keepdims=True)


def _channels_last(array: np.ndarray, front: int) -> np.ndarray:
    """Move a colour axis (1 or 3 channels) from position ``front`` to the end if it is not last."""
    if array.shape[-1] in (1, 3):
        return array
    if array.shape[front] in (1, 3):
        return np.moveaxis(array, front, -1)
    raise TypeError(f"the colour axis (last, or axis {front}) must have 1 or 3 channels "
                    f"(or be left out), got shape {array.shape}")


def gridify(obj, shape: Optional[Sequence[int]] = None, fill_value=None) -> np.ndarray:
    """Tile a batch of images ``(N, H, W)``, ``(N, H, W, 1|3)`` or ``(N, 1|3, H, W)`` into one
    ``(rows * H, cols * W, C)`` array, row-major (colour axis last).

    ``shape``: ``(rows, cols)``; by default ``cols = floor(sqrt(N))`` and as many rows as needed
    (Zennit's layout: tall rather than wide). Images beyond ``rows * cols`` are left out.
    ``fill_value`` fills empty cells: by default each channel's minimum over the batch.
    """
    array = _as_array(obj)
    if array.ndim not in (3, 4):
        raise TypeError(f"gridify needs a batch of images with 3 (grey) or 4 (colour) axes, got shape {array.shape}")
    if array.ndim == 3:
        array = array[..., None]
    array = _channels_last(array, front=1)
    n = len(array)
    if n == 0:
        raise ValueError("gridify needs at least one image")
    if shape is None:
        cols = math.isqrt(n)
        rows = -(-n // cols)
    else:
        rows, cols = shape
    if fill_value is None:
        fill_value = array.min(axis=(0, 1, 2))
    else:
        fill_value = np.asarray(fill_value).astype(array.dtype)
    return tile_grid(array[:rows * cols], rows, cols, fill=fill_value)


def _check_grid(grid) -> bool:
    """Whether ``grid`` asks for a grid; ``TypeError`` unless it is a bool or ``(rows, cols)``."""
    if grid is None or isinstance(grid, bool):
        return bool(grid)
    if (isinstance(grid, (list, tuple)) and len(grid) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in grid)):
        if min(grid) < 1:
            raise ValueError(f"grid must have positive (rows, cols), got {grid!r}")
        return True
    raise TypeError(f"grid must be a bool or (rows, cols) of two ints, got {grid!r}")


def _to_uint8(array: np.ndarray, vmin, vmax, symmetric: bool, dims: Tuple[int, ...]) -> np.ndarray:
    """Map ``[vmin, vmax]`` (from the data over ``dims`` where not given) linearly to 0..255."""
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if np.isnan(array).any():
        raise ValueError("imgify: the array contains NaN (it would get an arbitrary colour)")
    if vmin is None or vmax is None:
        low, high = interval_norm_bounds(array, symmetric=symmetric, dim=dims)
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
    vmin, vmax = np.asarray(vmin), np.asarray(vmax)
    span = vmax - vmin
    flat = span == 0
    # an empty interval (a constant image) goes to the centre of the map instead of 0 / 0
    unit = np.where(flat, 0.5, (array - vmin) / np.where(flat, 1, span))
    return (unit * 255.0).clip(0, 255).astype(np.uint8)


def imgify(obj, vmin=None, vmax=None, cmap: CMapLike = "bwr", level: float = 1.0,
           symmetric: bool = False, grid: Union[bool, Tuple[int, int]] = False, gridfill=None):
    """A ``PIL.Image`` of ``obj`` (an array or a tensor).

    Without a grid, ``obj`` is ``(H, W)``, ``(H, W, 1|3)`` or ``(1|3, H, W)``; with ``grid=True``
    (square-ish, see :func:`gridify`) or ``grid=(rows, cols)`` it has a leading batch axis.
    Arrays that are not uint8 are mapped from ``[vmin, vmax]`` to 0..255 (values outside are
    clipped); a bound not given comes from :func:`interval_norm_bounds` over the whole image (per
    sample with a grid), ``symmetric=True`` putting 0 at the centre. One channel gives a ``'P'``
    image with the palette of ``cmap`` at ``level`` (see :func:`palette`); three give ``'RGB'``.
    ``gridfill`` fills empty grid cells (default: the smallest pixel value).

    Raises ``TypeError`` for a bad number of axes or channels or a bad ``grid``, ``ValueError``
    for NaN.
    """
    from PIL import Image

    batched = _check_grid(grid)
    array = _as_array(obj)
    axes = (3, 4) if batched else (2, 3)
    if array.ndim not in axes:
        raise TypeError(f"imgify needs {axes[0]} or {axes[1]} axes{' (with the batch axis of grid)' * batched}, "
                        f"got shape {array.shape}")
    if array.ndim == axes[1]:
        array = _channels_last(array, front=int(batched))
    if array.dtype != np.uint8:
        dims = tuple(range(int(batched), array.ndim))
        array = _to_uint8(array, vmin, vmax, symmetric, dims)
    if batched:
        array = gridify(array, shape=None if grid is True else grid, fill_value=gridfill)
    elif array.ndim == 2:
        array = array[..., None]

    if array.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(array))  # 'RGB'
    image = Image.fromarray(np.ascontiguousarray(array[..., 0]))  # 'L' ...
    image.putpalette(palette(cmap, level).tobytes())  # ... becomes 'P' with the colour map
    return image


def imsave(fp, obj, vmin=None, vmax=None, cmap: CMapLike = "bwr", level: float = 1.0,
           grid: Union[bool, Tuple[int, int]] = False, format: Optional[str] = None,
           writer_params: Optional[dict] = None, symmetric: bool = False, gridfill=None) -> None:
    """Write :func:`imgify` ``(obj, ...)`` to ``fp`` (a path or a binary file object) with Pillow;
    ``format`` overrides the format taken from the file name, ``writer_params`` go to
    ``PIL.Image.Image.save``. (The argument order is Zennit's.)"""
    image = imgify(obj, vmin=vmin, vmax=vmax, cmap=cmap, level=level, symmetric=symmetric,
                   grid=grid, gridfill=gridfill)
    image.save(fp, format=format, **(writer_params or {}))
