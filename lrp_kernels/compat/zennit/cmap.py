"""Zennit's colour maps: :class:`ColorMap` compiled from a short source text, and the lazily
compiling :class:`LazyColorMapCache` that holds the named maps of
:data:`lrp_kernels.compat.zennit.image.CMAPS`.

The source text lists colours separated by commas; each colour is 3 or 6 hexadecimal digits
(``f80`` is ``ff8800``). A colour may be pinned to a position of the 256-entry palette by a
prefix of 1 or 2 hexadecimal digits and a colon (``80:fff`` puts white at 0x80; one digit is
doubled, ``8:`` is ``88:``). Positions must not decrease from left to right; an equal position
twice makes a jump. The first colour without a prefix sits at 0, the last at 0xff, and colours
without a prefix in between are spread evenly (rounded down) between their pinned neighbours.
A map pinned away from an end holds its end colour up to that end. Between colours the map is
linear (the interpolation itself is
:func:`lrp_kernels.explanations.imaging.piecewise_linear_colors`).

Examples: ``'000,fff'`` black to white; ``'00f,80:fff,f00'`` blue, white at the centre, red.
"""
from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Dict, Iterator, List, NamedTuple, Optional

import numpy as np

from ...explanations.imaging import piecewise_linear_colors

__all__ = ["ColorMap", "ColorNode", "LazyColorMapCache"]

# one comma-separated entry: an optional position prefix and a 6- or 3-digit colour
_ENTRY = re.compile(r"\s*(?:(?P<position>[0-9a-fA-F]{1,2})\s*:\s*)?(?P<color>[0-9a-fA-F]{6}|[0-9a-fA-F]{3})\s*")

_LAST = 0xff


class ColorNode(NamedTuple):
    """One colour of a compiled map: its palette position (0 to 255; ``None`` while not yet
    placed) and its RGB value (three integers 0 to 255)."""
    index: Optional[int]
    value: np.ndarray


def _read_entry(number: int, entry: str) -> ColorNode:
    match = _ENTRY.fullmatch(entry)
    if match is None:
        raise RuntimeError(f"ColorMap: entry {number} ({entry!r}) is not '[position:]colour' with a "
                           "1-2 digit hexadecimal position and a 3 or 6 digit hexadecimal colour")
    digits = match["color"]
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    position = match["position"]
    if position is not None:
        position = int(position * 2 if len(position) == 1 else position, 16)
    return ColorNode(position, np.array([int(digits[i:i + 2], 16) for i in (0, 2, 4)]))


def parse_source(source: str) -> List[ColorNode]:
    """The colours of ``source`` in order, with the positions written there (or ``None``).

    Raises ``RuntimeError`` naming the entry that cannot be read.
    """
    if not isinstance(source, str):
        raise TypeError(f"ColorMap source must be a str, got {type(source).__name__}")
    entries = source.split(",")
    if len(entries) > 1 and not entries[-1].strip():
        entries.pop()  # Zennit accepts one trailing comma
    return [_read_entry(n, entry) for n, entry in enumerate(entries)]


def place_nodes(nodes: List[ColorNode]) -> List[ColorNode]:
    """Every node of ``nodes`` with its palette position, from 0 to 0xff, ends included.

    Raises ``RuntimeError`` for fewer than two colours or decreasing positions.
    """
    if len(nodes) < 2:
        raise RuntimeError(f"ColorMap needs at least 2 colours, got {len(nodes)}")
    first, last = nodes[0], nodes[-1]
    nodes = ([ColorNode(0, first.value)] if first.index is None else [first]) + list(nodes[1:-1]) \
        + ([ColorNode(_LAST, last.value)] if last.index is None else [last])
    pinned = [i for i, node in enumerate(nodes) if node.index is not None]
    for a, b in zip(pinned, pinned[1:]):
        left, right = nodes[a].index, nodes[b].index
        if right < left:
            raise RuntimeError(f"ColorMap positions must not decrease, got {left:#04x} before {right:#04x}")
        steps = b - a
        for k in range(1, steps):  # spread the unpinned ones, rounded down as Zennit does
            nodes[a + k] = ColorNode((left * (steps - k) + right * k) // steps, nodes[a + k].value)
    # a map pinned away from the ends keeps its end colours up to the ends
    if nodes[0].index > 0:
        nodes.insert(0, ColorNode(0, nodes[0].value))
    if nodes[-1].index < _LAST:
        nodes.append(ColorNode(_LAST, nodes[-1].value))
    return nodes


def _truncate_uint8(values: np.ndarray) -> np.ndarray:
    """``values`` (0 to 255) as uint8, rounded down after float noise below 1e-12 is rounded off
    (so 127.99999999999997 is 128 while 127.5 stays 127, as in Zennit's palettes)."""
    return np.round(values, 12).clip(0.0, 255.0).astype(np.uint8)


class ColorMap:
    """A linear colour map compiled from ``source`` (the language of this module's docstring).

    Calling it maps values in ``[0, 1]`` (clipped) to RGB in ``[0, 1]`` on a new last axis;
    :meth:`palette` gives the 256 uint8 colours of an indexed (``'P'``) image. Assigning
    :attr:`source` recompiles the map in place; source text that does not compile raises
    ``RuntimeError`` and leaves the map as it was.
    """

    def __init__(self, source: str):
        self._source: Optional[str] = None
        self.source = source

    @property
    def source(self) -> str:
        """The source text the map was compiled from."""
        return self._source

    @source.setter
    def source(self, value: str) -> None:
        nodes = place_nodes(parse_source(value))  # compile first: a bad source changes nothing
        self._positions = np.array([node.index for node in nodes], dtype=np.float64)
        self._colors = np.stack([node.value for node in nodes]).astype(np.float64) / 255.0
        self._source = value

    def __call__(self, x) -> np.ndarray:
        """RGB in ``[0, 1]`` of ``x`` (any shape, clipped to ``[0, 1]``): ``x.shape + (3,)``."""
        return piecewise_linear_colors(np.asarray(x, dtype=np.float64) * _LAST, self._positions, self._colors)

    def palette(self, level: float = 1.0) -> np.ndarray:
        """The 256 colours (uint8, ``(256, 3)``) of an indexed image of this map.

        ``level`` stretches the map around its centre: 1 uses it as it is; below 1 only a part
        around the centre is used (at 0, only the centre colour); above 1 the ends are reached
        before the ends of the palette (saturation).
        """
        x = 0.5 + level * (np.arange(256, dtype=np.float64) / _LAST - 0.5)
        return _truncate_uint8(self(x.clip(0.0, 1.0)) * 255.0)

    def __repr__(self) -> str:
        return f"ColorMap({self._source!r})"


class LazyColorMapCache(MutableMapping):
    """A dict of colour-map sources by name that hands out :class:`ColorMap` objects, each
    compiled on first access and kept. Assigning a new source to a compiled name recompiles that
    same object, so references held elsewhere follow; a source that does not compile raises
    ``RuntimeError`` and changes nothing."""

    def __init__(self, sources: Dict[str, str]):
        self._sources = sources
        self._compiled: Dict[str, ColorMap] = {}

    def __getitem__(self, name: str) -> ColorMap:
        if name not in self._sources:
            raise KeyError(f"no colour map named {name!r}; known: {sorted(self._sources)}")
        if name not in self._compiled:
            self._compiled[name] = ColorMap(self._sources[name])
        return self._compiled[name]

    def __setitem__(self, name: str, source: str) -> None:
        if name in self._compiled:
            self._compiled[name].source = source
        self._sources[name] = source

    def __delitem__(self, name: str) -> None:
        del self._sources[name]
        self._compiled.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)
