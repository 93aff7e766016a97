"""Tools around the rules: :mod:`~lrp_kernels.tools.check` (conservation check mode),
:mod:`~lrp_kernels.tools.compare` (every backend vs a float64 oracle),
:mod:`~lrp_kernels.tools.profile` (time and memory of explanations at long context),
:mod:`~lrp_kernels.tools.faithfulness` (perturbation curves and ABPC per attribution method) and
:mod:`~lrp_kernels.tools.recall_prompts` (held-out prompts of the shipped model's task)."""
from . import check

__all__ = ["check"]
