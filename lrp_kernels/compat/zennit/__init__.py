"""Zennit 0.5.1's API on lrp_kernels: ``import lrp_kernels.compat.zennit as zennit``.

Submodules as in Zennit: :mod:`.core` (stabilisers, ParamMod, Hook, BasicHook, Composite),
:mod:`.rules`, :mod:`.composites`, :mod:`.canonizers`, :mod:`.types`, :mod:`.layer`,
:mod:`.torchvision` (VGG / ResNet canonizers; imported on its own, as it needs torchvision),
:mod:`.attribution`, :mod:`.image` and :mod:`.cmap`. Zennit's own test suite judges this package
(tests/compat/test_zennit_suite.py); docs/compat-zennit.md maps every name to ours and lists where
our main API differs and why.
"""
from . import attribution, canonizers, cmap, composites, core, image, layer, rules, types

__all__ = ["attribution", "canonizers", "cmap", "composites", "core", "image", "layer", "rules", "torchvision",
           "types"]
