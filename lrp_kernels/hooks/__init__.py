"""Zennit-style LRP: rules as hooks on module instances.

:mod:`~lrp_kernels.hooks.core` is the engine (:class:`Hook`, :class:`BasicHook`,
:class:`ParamMod`); :mod:`~lrp_kernels.hooks.rules` configures it into the classic rules
(Epsilon, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox, ...); :mod:`~lrp_kernels.hooks.composites`
puts rules on a model by layer type, name or position; :mod:`~lrp_kernels.hooks.attention` has
AttnLRP / CP-LRP for ``nn.MultiheadAttention``. Every name is available from here.
"""
from . import attention, composites, core, rules
from .attention import *  # noqa: F401,F403
from .composites import *  # noqa: F401,F403
from .core import *  # noqa: F401,F403
from .rules import *  # noqa: F401,F403

__all__ = core.__all__ + rules.__all__ + composites.__all__ + attention.__all__
