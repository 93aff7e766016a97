"""Image heatmaps of relevance: a diverging blue-white-red colour map and image grids.

``imgify(heatmaps, vmin=-1, vmax=1, grid=(rows, cols))`` turns one 2-D array (or a list / a
3-D stack of them) into a PIL image: blue for negative relevance (evidence against), white for
zero, red for positive (evidence for). Without ``vmin``/``vmax`` the scale is symmetric around
zero, ``[-m, m]`` with ``m = max |relevance|`` over all heatmaps, so colours are comparable
between the cells of a grid. Needs numpy and Pillow (Pillow comes with matplotlib).

Two building blocks are shared with the Zennit-compatible helpers
(:mod:`lrp_kernels.compat.zennit.image`, :mod:`lrp_kernels.compat.zennit.cmap`), so a colour map
is interpolated and a grid is laid out in one place: :func:`piecewise_linear_colors` and
:func:`tile_grid`.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import numpy as np

__all__ = ["diverging_colors", "imgify", "heatmap_grid", "piecewise_linear_colors", "tile_grid"]

# anchors of the map: value 0 -> blue, 0.5 -> white, 1 -> red (RGB in [0, 1])
_ANCHORS = np.array([[0.0, 0.0, 0.0, 1.0],
                     [0.25, 0.45, 0.6, 1.0],
                     [0.5, 1.0, 1.0, 1.0],
                     [0.75, 1.0, 0.45, 0.35],
                     [1.0, 1.0, 0.0, 0.0]])


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, any device / dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_limit(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value)):
        raise ValueError(f"{name} must be None or a finite number, got {value!r}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def piecewise_linear_colors(t, positions: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Colours at ``t`` (any shape) of the map that runs linearly from ``colors[i]`` at
    ``positions[i]`` to ``colors[i + 1]`` at ``positions[i + 1]``: ``t.shape + colors.shape[1:]``.

    ``positions`` must not decrease; ``t`` is clipped to ``[positions[0], positions[-1]]``. A
    position given twice is a jump: from the left the map reaches the first of its two colours,
    at the position itself it has the second.
    """
    positions = np.asarray(positions, dtype=np.float64)
    colors = np.asarray(colors, dtype=np.float64)
    t = np.clip(np.asarray(t, dtype=np.float64), positions[0], positions[-1])
    # the segment [left, right] that holds t; side="right" makes a jump take its second colour
    right = np.searchsorted(positions, t, side="right").clip(1, len(positions) - 1)
    left = right - 1
    span = positions[right] - positions[left]
    alpha = np.where(span > 0, (t - positions[left]) / np.where(span > 0, span, 1.0), 1.0)[..., None]
    return colors[left] * (1.0 - alpha) + colors[right] * alpha


def tile_grid(stack: np.ndarray, rows: int, cols: int, pad: int = 0, fill=0) -> np.ndarray:
    """Lay the images of ``stack`` (``N, H, W, C``) out row-major on a ``rows x cols`` grid with
    ``pad`` pixels between cells: a ``(rows * H + (rows - 1) * pad, cols * W + (cols - 1) * pad, C)``
    array of ``stack``'s dtype. Padding and empty cells get ``fill`` (one value, or one per channel).
    """
    n, h, w, channels = stack.shape
    if rows * cols < n:
        raise ValueError(f"grid ({rows}, {cols}) has {rows * cols} cells for {n} images")
    out = np.empty((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, channels), dtype=stack.dtype)
    out[...] = np.reshape(fill, -1)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = stack[i]
    return out


def diverging_colors(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``values`` -> uint8 RGB (``[..., 3]``): ``vmin`` blue, the middle white, ``vmax`` red.
    Values outside ``[vmin, vmax]`` are clipped; NaN is an error (never a silent colour)."""
    _check_limit("vmin", vmin)
    _check_limit("vmax", vmax)
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("heatmap contains NaN")
    if not vmax > vmin:
        raise ValueError(f"vmax must be greater than vmin, got vmin={vmin}, vmax={vmax}")
    t = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    rgb = piecewise_linear_colors(t, _ANCHORS[:, 0], _ANCHORS[:, 1:])
    return np.round(rgb * 255).astype(np.uint8)


def _stack(heatmaps) -> np.ndarray:
    if isinstance(heatmaps, (list, tuple)):
        arrays = [_to_numpy(h) for h in heatmaps]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all heatmaps must have one shape, got {sorted(shapes)}")
        stack = np.stack(arrays)
    else:
        stack = _to_numpy(heatmaps)
        if stack.ndim == 2:
            stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"heatmaps must be 2-D arrays (H, W) or a stack (N, H, W), got shape {stack.shape}")
    return stack


def heatmap_grid(heatmaps, grid: Optional[Tuple[int, int]] = None, pad: int = 2,
                 vmin: Optional[float] = None, vmax: Optional[float] = None,
                 symmetric: bool = True) -> np.ndarray:
    """uint8 RGB array of the heatmaps laid out row-major in ``grid = (rows, cols)``
    (default: as square as possible), ``pad`` white pixels between cells. Bad numbers
    (a non-positive grid, a negative pad, a non-finite vmin / vmax) are a ``ValueError``
    naming the argument, before any work."""
    _check_int("pad", pad, 0)
    _check_limit("vmin", vmin)
    _check_limit("vmax", vmax)
    if grid is not None:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ValueError(f"grid must be (rows, cols), got {grid!r}")
        _check_int("grid rows", grid[0], 1)
        _check_int("grid cols", grid[1], 1)
    stack = _stack(heatmaps)
    if np.isnan(stack).any():  # before the colour limits are derived from the data
        raise ValueError("heatmap contains NaN")
    n = len(stack)
    if grid is None:
        cols = math.ceil(math.sqrt(n))
        grid = (math.ceil(n / cols), cols)
    rows, cols = grid
    if rows * cols < n:
        raise ValueError(f"grid {grid} has {rows * cols} cells for {n} heatmaps")
    if vmin is None or vmax is None:
        m = float(np.abs(stack).max()) or 1.0
        lo, hi = (-m, m) if symmetric else (float(stack.min()), float(stack.max()))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
        if vmax <= vmin:
            vmax = vmin + 1.0
    return tile_grid(diverging_colors(stack, vmin, vmax), rows, cols, pad=pad, fill=255)


def imgify(heatmaps, vmin: Optional[float] = None, vmax: Optional[float] = None,
           grid: Optional[Tuple[int, int]] = None, symmetric: bool = True, pad: int = 2,
           scale: int = 1):
    """A ``PIL.Image`` of one heatmap or a grid of them (see :func:`heatmap_grid`);
    ``scale`` enlarges each pixel to ``scale x scale`` (nearest neighbour)."""
    from PIL import Image
    _check_int("scale", scale, 1)
    arr = heatmap_grid(heatmaps, grid=grid, pad=pad, vmin=vmin, vmax=vmax, symmetric=symmetric)
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(arr)  # uint8 (H, W, 3): RGB
