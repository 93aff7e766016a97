"""lrp_kernels: fast, exact Layer-wise Relevance Propagation (AttnLRP) for PyTorch transformers.

Layers, from the user down: public API (``functional``, ``grad``, ``modules``, ...) ->
rule (:mod:`lrp_kernels.ops`) -> :mod:`lrp_kernels.dispatch` -> backend (torch, cpp, triton).
"""
from . import ops  # noqa: F401  (registers the torch kernels)
from . import functional, grad, modules  # noqa: F401
from .dispatch import (BackendUnavailableError, available_backends, current_backend,  # noqa: F401
                       use_backend)
from .ops._common import stabilize  # noqa: F401
from . import check, rules  # noqa: F401  (conservation check mode; LXT-style rules)
from .composite import Composite  # noqa: F401
from . import hook_composites, hooks, imaging, lrp_rules  # noqa: F401  (Zennit-style rules, composites, image heatmaps)
from .attention import attnlrp_attention  # noqa: F401  (fused AttnLRP attention block)
from . import latent  # noqa: F401  (relevance of hidden states in the same backward)
from .patch import PatchHandle, UnsupportedModelError, patch  # noqa: F401  (Hugging Face model patches)
from .explain import Explanation, explain  # noqa: F401  (user-facing API; shadows the module name)

__version__ = "0.1.0"
