"""Hugging Face transformers: reversible, instance-scoped AttnLRP / CP-LRP patches.

:func:`patch` (:mod:`~lrp_kernels.hf.patching`) installs on one model instance the gradient-view
rules of :mod:`~lrp_kernels.hf.installers`, chosen per module by the model's family
(:mod:`lrp_kernels.hf.families`), and routes attention through the adapter of
:mod:`~lrp_kernels.hf.attention`. :mod:`~lrp_kernels.hf.latent` records the relevance of hidden
states in the same backward.
"""
from . import latent
from .families import REGISTRY, Family, register_family
from .patching import PatchHandle, UnsupportedModelError, patch

__all__ = ["patch", "PatchHandle", "UnsupportedModelError", "latent", "Family", "REGISTRY",
           "register_family"]
