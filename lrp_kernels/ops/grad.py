"""Explicit drop-ins, gradient view (docs/math.md): what model patches use.

Each backward returns a *modified gradient*; the relevance of any tensor ``t`` is
``t * t.grad``. Ops that are linear with constant coefficients (reshape, RoPE, scaling,
residual sums, embedding lookup) need no patch in this view. Same names, signatures and rule
implementations as :mod:`lrp_kernels.ops.functional` (whose docstrings give the relevance-view
formulas; docs/math.md gives both).
"""
from ._views import NAMES as __all__, publish

publish(globals(), relevance_view=False)
