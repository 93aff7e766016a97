"""Explicit drop-ins, relevance view (docs/math.md).

Each is a ``torch.autograd.Function`` whose forward equals the plain op and whose backward
propagates *relevance*::

    y = linear_epsilon(x, W, b)
    y.backward(y)          # start with R_y = y (or any relevance)
    relevance = x.grad

The gradient-view twins (what model patches use) are in :mod:`lrp_kernels.ops.grad`; both are
built by :mod:`lrp_kernels.ops._views` over the same rule implementations in :mod:`lrp_kernels.ops`.
Functions: linear_epsilon, add2, add, mul2, matmul, softmax, rms_norm_identity, layer_norm,
mean, normalize, identity, stop_relevance.

Every ``epsilon`` is keyword-only, except ``linear_epsilon``'s (after ``F.linear``'s own
arguments), so a positional flag such as LXT's ``inplace`` can never become a stabiliser;
defaults equal the torch function each one replaces (``normalize``: ``dim=1``). LXT's own
signatures are in :mod:`lrp_kernels.compat.lxt`.
"""
from ._views import NAMES as __all__, publish

publish(globals(), relevance_view=True)
