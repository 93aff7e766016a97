"""Older LXT spelling ``lxt.functional``: the same module as :mod:`lrp_kernels.compat.lxt.explicit.functional`."""
import sys

from .explicit import functional as _explicit

sys.modules[__name__] = _explicit
