"""Tools around the rules: :mod:`~lrp_kernels.tools.check` (conservation check mode),
:mod:`~lrp_kernels.tools.compare` (every backend vs a float64 oracle) and
:mod:`~lrp_kernels.tools.profile` (time and memory of explanations at long context)."""
from . import check

__all__ = ["check"]
