"""From a model and a prompt to a result a person reads: :func:`explain`, :class:`Explanation`,
text heatmaps (:mod:`~lrp_kernels.explanations.heatmap`) and image heatmaps
(:mod:`~lrp_kernels.explanations.imaging`)."""
from . import heatmap, imaging
from .api import Explanation, explain

__all__ = ["Explanation", "explain", "heatmap", "imaging"]
