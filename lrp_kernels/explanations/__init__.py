"""From a model and a prompt to a result a person reads: :func:`explain`, :class:`Explanation`,
:func:`explain_image` (:mod:`~lrp_kernels.explanations.image`: pixels and caption tokens), RAG
sources per answer sentence (:mod:`~lrp_kernels.explanations.sources`), the interactive viewer
(:mod:`~lrp_kernels.explanations.viewer`), text heatmaps (:mod:`~lrp_kernels.explanations.heatmap`) and image heatmaps
(:mod:`~lrp_kernels.explanations.imaging`), whole datasets (:func:`explain_dataset`,
:mod:`~lrp_kernels.explanations.batch`)."""
from . import heatmap, imaging, sources, viewer
from .api import Explanation, explain
from .batch import BatchReport, explain_dataset
from .image import ImageExplanation, explain_image
from .matrix import RelevanceMatrix, explain_matrix
from .sources import SourceReport, attribute_sources, build_prompt, explain_sources
from .viewer import write_viewer

__all__ = ["Explanation", "explain", "explain_image", "ImageExplanation", "explain_matrix", "RelevanceMatrix",
           "heatmap", "imaging", "sources", "viewer", "SourceReport", "attribute_sources",
           "build_prompt", "explain_sources", "write_viewer", "explain_dataset", "BatchReport"]
