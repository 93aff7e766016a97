"""LXT 2.1's explicit API on lrp_kernels: ``import lrp_kernels.compat.lxt as lxt``.

Switching from LXT is an import change: ``lxt.explicit.functional`` is
:mod:`lrp_kernels.compat.lxt.explicit.functional`, and so on for ``modules``, ``rules``,
``core`` (``Composite``), ``special``, ``check``, ``models.llama`` / ``models.mixtral``
(``attnlrp.register(model)``) and ``utils`` (heatmaps); the older spellings ``lxt.functional``,
``lxt.modules``, ``lxt.rules`` and ``lxt.core`` are the same modules. Everything is built on
lrp_kernels' own rules and kernels, with LXT's names, signatures, defaults and conventions;
docs/compat-lxt.md lists every name with its main-API equivalent and the differences. LXT's own
test suite judges this layer (tests/compat/test_lxt_suite.py). LXT's ``efficient`` API is not
covered: :func:`lrp_kernels.patch` is its counterpart.
"""
from . import explicit, utils  # noqa: F401
from .explicit import core, functional, modules, rules  # noqa: F401

__all__ = ["explicit", "utils", "core", "functional", "modules", "rules"]
