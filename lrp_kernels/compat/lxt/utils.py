"""LXT's ``lxt.utils``: token clean-up and LaTeX heatmaps, on :mod:`lrp_kernels.explanations.heatmap`.

Differences: :func:`clean_tokens` returns display text (our ``pdf_heatmap`` escapes LaTeX
itself, LXT escapes in ``clean_tokens``), and accepts any tokenizer's pieces (LXT raises for
schemes other than sentencepiece, byte-level BPE and WordPiece). Without LaTeX, write HTML or
PNG with :func:`lrp_kernels.explanations.heatmap.html_heatmap` / ``png_heatmap``.
"""
from __future__ import annotations

import os
from typing import List, Sequence

from ...explanations import heatmap as _heatmap

__all__ = ["pdf_heatmap", "clean_tokens", "clean_words"]


def clean_tokens(words: Sequence[str]) -> List[str]:
    """Tokenizer pieces as readable text: ``▁`` / ``Ġ`` become spaces (our
    :func:`~lrp_kernels.explanations.heatmap.clean_tokens`); WordPiece pieces (``##ing``) join
    the word before them, other WordPiece tokens start with a space (LXT's convention)."""
    words = list(words)
    if any(w.startswith("##") for w in words) and not any(("\u2581" in w or "\u0120" in w) for w in words):
        words = [w[2:] if w.startswith("##") else " " + w for w in words]
        if words:
            words[0] = words[0].lstrip()
        return words
    return _heatmap.clean_tokens(words)


clean_words = clean_tokens  # the name LXT's older documentation uses


def pdf_heatmap(words: Sequence[str], relevances, cmap: str = "bwr", path: str = "heatmap.pdf",
                delete_aux_files: bool = True, backend: str = "xelatex") -> None:
    """Write a PDF heatmap of ``words`` coloured by ``relevances`` (normalised to [-1, 1]:
    red positive, blue negative) with ``xelatex`` or ``pdflatex``.

    Raises ``ValueError`` when the lengths differ or a relevance is outside [-1, 1], and
    :class:`lrp_kernels.explanations.heatmap.HeatmapError` when the LaTeX binary is missing.
    ``cmap`` must be ``"bwr"`` (the one colour map our heatmaps draw).
    """
    if cmap != "bwr":
        raise ValueError(f"cmap must be 'bwr' (the only colour map drawn here), got {cmap!r}")
    values = [float(r) for r in (relevances.tolist() if hasattr(relevances, "tolist") else relevances)]
    if len(values) != len(words):
        raise ValueError(f"words and relevances must have the same length, got {len(words)} and {len(values)}")
    if values and (min(values) < -1 or max(values) > 1):
        raise ValueError("relevances must be normalised to [-1, 1] (relevance / relevance.abs().max())")
    # scale=1: the caller normalised already, colours follow the values as given
    _heatmap.pdf_heatmap(words, values, os.fspath(path), backend=backend, scale=1.0, keep_tex=not delete_aux_files)
