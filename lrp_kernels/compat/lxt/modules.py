"""Older LXT spelling ``lxt.modules``: the same module as :mod:`lrp_kernels.compat.lxt.explicit.modules`."""
import sys

from .explicit import modules as _explicit

sys.modules[__name__] = _explicit
