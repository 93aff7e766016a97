"""From a model and a prompt to a result a person reads: :func:`explain`, :class:`Explanation`,
:func:`explain_image` (:mod:`~lrp_kernels.explanations.image`: pixels and caption tokens), text
heatmaps (:mod:`~lrp_kernels.explanations.heatmap`) and image heatmaps
(:mod:`~lrp_kernels.explanations.imaging`)."""
from . import heatmap, imaging
from .api import Explanation, explain
from .image import ImageExplanation, explain_image
from .matrix import RelevanceMatrix, explain_matrix

__all__ = ["Explanation", "explain", "explain_image", "ImageExplanation", "explain_matrix", "RelevanceMatrix",
           "heatmap", "imaging"]
