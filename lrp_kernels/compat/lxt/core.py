"""Older LXT spelling ``lxt.core``: the same module as :mod:`lrp_kernels.compat.lxt.explicit.core`."""
import sys

from .explicit import core as _explicit

sys.modules[__name__] = _explicit
