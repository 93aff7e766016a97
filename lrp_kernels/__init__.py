"""lrp_kernels: fast, exact Layer-wise Relevance Propagation (AttnLRP) for PyTorch transformers.

One subpackage per paradigm; data flows one way, from the user down::

    public API  ->  rule (ops/)  ->  dispatcher (backends/dispatch.py)  ->  backend (torch, cpp, triton)

============================  ===============================================================
``lrp_kernels.ops``           every rule once: math, torch backend, autograd Function; the
                              drop-ins ``functional`` (relevance view), ``grad`` (gradient
                              view), ``modules``; the AttnLRP attention block
``lrp_kernels.backends``      the dispatcher (the only code that knows devices), C++, Triton
``lrp_kernels.explicit``      LXT-style: rules for whole modules, ``Composite``, fx tracing
``lrp_kernels.hooks``         Zennit-style: ``Hook`` / ``BasicHook``, rules, composites
``lrp_kernels.hf``            Hugging Face: ``patch``, model families, ``latent``
``lrp_kernels.explanations``  ``explain``, ``Explanation``, text and image heatmaps
``lrp_kernels.tools``         ``check`` (conservation), ``compare`` (backends), ``profile``
``lrp_kernels.cli``           the ``lrp-kernels`` command
============================  ===============================================================

The short names users type are here: ``lrp_kernels.patch``, ``explain``, ``functional``,
``grad``, ``modules``, ``rules``, ``Composite``, ``hooks``, ``check``, ``latent``.
"""
import sys as _sys

from . import ops
from .ops import functional, grad, modules
from .ops._common import DEFAULT_EPSILON, stabilize
from .ops.attention import attnlrp_attention
from .backends import BackendUnavailableError, available_backends, current_backend, use_backend
from .explicit import Composite, rules
from . import hooks
from .tools import check
from .hf import PatchHandle, UnsupportedModelError, latent, patch
from .explanations import Explanation, ImageExplanation, RelevanceMatrix, explain, explain_image, explain_matrix

# `import lrp_kernels.functional as lf` (and the other short names) load the real module
for _name, _module in {"functional": functional, "grad": grad, "modules": modules, "rules": rules,
                       "check": check, "latent": latent}.items():
    _sys.modules[f"{__name__}.{_name}"] = _module

__version__ = "0.1.0"

__all__ = ["functional", "grad", "modules", "rules", "Composite", "hooks", "check", "latent",
           "patch", "PatchHandle", "UnsupportedModelError", "explain", "Explanation",
           "explain_matrix", "RelevanceMatrix", "explain_image", "ImageExplanation",
           "attnlrp_attention", "stabilize", "DEFAULT_EPSILON", "available_backends",
           "current_backend", "use_backend", "BackendUnavailableError", "ops"]
