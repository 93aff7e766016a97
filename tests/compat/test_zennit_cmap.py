"""lrp_kernels.compat.zennit.cmap: the colour-map source language, palettes against a reference
interpolation written here, and the lazy cache."""
import numpy as np
import pytest

from lrp_kernels.compat.zennit.cmap import ColorMap, LazyColorMapCache, parse_source, place_nodes
from lrp_kernels.compat.zennit.image import CMAPS
from lrp_kernels.explanations.imaging import piecewise_linear_colors


def reference_palette(nodes):
    """uint8 palette from (position, (r, g, b)) nodes by np.interp, truncated like Zennit's."""
    positions = np.array([p for p, _ in nodes], dtype=np.float64)
    colors = np.array([c for _, c in nodes], dtype=np.float64)
    x = np.arange(256, dtype=np.float64)
    rgb = np.stack([np.interp(x, positions, colors[:, c]) for c in range(3)], axis=-1)
    return np.floor(rgb + 1e-9).astype(np.uint8)


@pytest.mark.parametrize("source,nodes", [
    # short colours double each digit; unpinned ends sit at 0 and 0xff
    ("000,fff", [(0, (0, 0, 0)), (255, (255, 255, 255))]),
    ("f80,08f", [(0, (255, 136, 0)), (255, (0, 136, 255))]),
    # two colours between 0 and 0xff: at floor(255 / 3) = 85 and floor(2 * 255 / 3) = 170
    ("000,f00,ff0,fff", [(0, (0, 0, 0)), (85, (255, 0, 0)), (170, (255, 255, 0)), (255, (255, 255, 255))]),
    # one colour between 0 and 0x80: at 64
    ("123456,000,80:fff", [(0, (0x12, 0x34, 0x56)), (64, (0, 0, 0)), (0x80, (255,) * 3), (255, (255,) * 3)]),
    # a one-digit position is doubled: 4: is 0x44
    ("f00,4:000,fff", [(0, (255, 0, 0)), (0x44, (0, 0, 0)), (255, (255,) * 3)]),
    # pinned away from the ends: the end colours hold to the ends
    ("20:f00, e0:00f", [(0, (255, 0, 0)), (0x20, (255, 0, 0)), (0xe0, (0, 0, 255)), (255, (0, 0, 255))]),
])
def test_palette_matches_reference(source, nodes):
    cmap = ColorMap(source)
    assert np.array_equal(cmap.palette(), reference_palette(nodes))
    # calling the map at i / 255 gives the same colours
    called = cmap(np.arange(256) / 255.0) * 255.0
    assert np.allclose(called, reference_palette(nodes), atol=1.0)


def test_equal_positions_make_a_jump():
    cmap = ColorMap("000,80:f00,80:00f,fff")
    pal = cmap.palette()
    assert pal[0x80].tolist() == [0, 0, 255]  # at the position: the second colour
    assert pal[0x7f].tolist() == [253, 0, 0]  # just before: almost the first (127 / 128 of 255)


@pytest.mark.parametrize("level", [0.0, 0.5, 2.0])
def test_level_stretches_around_the_centre(level):
    # palette entry i shows the map at 0.5 + level * (i / 255 - 0.5), clipped to [0, 1]
    gray = ColorMap("000,fff").palette(level=level)
    x = np.clip(0.5 + level * (np.arange(256) / 255 - 0.5), 0, 1) * 255
    assert np.array_equal(gray[:, 0], np.floor(x + 1e-9).astype(np.uint8))
    assert (gray == gray[:, :1]).all()


@pytest.mark.parametrize("source", ["", "fff", "ff,000", "000;fff", "0:000:fff", "fff,,000", "80:000,40:fff",
                                    "000,fff0", "100:000,fff"])
def test_bad_source_is_an_error(source):
    with pytest.raises(RuntimeError):
        ColorMap(source)


def test_bad_source_keeps_the_map():
    cmap = ColorMap("000,fff")
    before = cmap.palette()
    with pytest.raises(RuntimeError):
        cmap.source = "nonsense"
    assert cmap.source == "000,fff" and np.array_equal(cmap.palette(), before)
    cmap.source = "fff,000"
    assert np.array_equal(cmap.palette(), before[::-1])


def test_parse_and_place():
    nodes = parse_source("000, 8:fff,")  # one trailing comma is accepted, as in Zennit
    assert [n.index for n in nodes] == [None, 0x88]
    assert [n.index for n in place_nodes(nodes)] == [0, 0x88, 0xff]


def test_piecewise_linear_colors_clips_and_interpolates():
    out = piecewise_linear_colors(np.array([-1.0, 0.25, 2.0]), np.array([0.0, 1.0]), np.array([[0.0], [4.0]]))
    assert out[:, 0].tolist() == [0.0, 1.0, 4.0]


def test_lazy_cache_compiles_once_and_updates_in_place():
    sources = {"gray": "000,fff"}
    cache = LazyColorMapCache(sources)
    assert cache["gray"] is cache["gray"]
    held = cache["gray"]
    cache["gray"] = "fff,000"
    assert held.source == "fff,000" and cache["gray"] is held
    with pytest.raises(RuntimeError):
        cache["gray"] = "bad"
    assert cache["gray"].source == "fff,000" and sources["gray"] == "fff,000"
    cache["red"] = "000,f00"
    assert list(cache) == ["gray", "red"] and len(cache) == 2 and "red" in cache
    del cache["gray"]
    with pytest.raises(KeyError, match="gray"):
        cache["gray"]


def test_named_maps_compile_and_centre():
    for name in CMAPS:
        assert CMAPS[name].palette().shape == (256, 3)
    assert CMAPS["bwr"].palette()[0x80].tolist() == [255, 255, 255]
    assert CMAPS["coldnhot"].palette()[0x80].tolist() == [0, 0, 0]
