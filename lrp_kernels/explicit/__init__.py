"""LXT-style explicit LRP: rules for whole modules, the :class:`Composite`, fx tracing.

A rule (:mod:`~lrp_kernels.explicit.rules`) wraps an ``nn.Module`` and replaces its backward
by VJPs of the module itself; the :class:`~lrp_kernels.explicit.composite.Composite` puts rules
(or drop-in modules) on a model by type or name and removes them exactly; with ``fx=True`` it
traces the model (:mod:`~lrp_kernels.explicit.fx`) and swaps functions (add, matmul, softmax,
...) for their drop-ins.
"""
from . import rules
from .composite import Composite

__all__ = ["Composite", "rules"]
