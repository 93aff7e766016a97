"""Older LXT spelling ``lxt.rules``: the same module as :mod:`lrp_kernels.compat.lxt.explicit.rules`."""
import sys

from .explicit import rules as _explicit

sys.modules[__name__] = _explicit
