"""LXT's sanity check (``lxt.explicit.check``) on our conservation check mode.

``with conservation_check():`` runs :func:`lrp_kernels.check.conservation` and yields its
report (per-rule relevance sums, ``report.first_violation()``). LXT's check instead replaces
every rule's output by the uniform mean of its input relevance, so that the relevance reaching
the input sums to the output's only if every operation on the path is a rule; ours leaves the
relevance unchanged and names the rule that loses relevance, which says more and can stay on
while explaining.

LXT's ``WHITELIST`` / ``BLACKLIST`` (operations its tracing summary marks as passing relevance
or not) have no counterpart: our fx rewriting classifies every traced node itself, from the
values of a run on the dummy inputs (:mod:`lrp_kernels.explicit.fx`).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ....tools import check as _check

__all__ = ["conservation_check", "conservation_check_wrap", "CONSERVATION_CHECK_FLAG"]


class _Flag(list):
    """``CONSERVATION_CHECK_FLAG[0]`` reads whether a check is active; setting it by hand is
    refused (it would switch nothing here): use ``with conservation_check():``."""

    def __getitem__(self, i):
        return _check.active() if i in (0, -1) else super().__getitem__(i)

    def __setitem__(self, i, value):
        raise TypeError("CONSERVATION_CHECK_FLAG is read-only here: use `with conservation_check() as report:`")


CONSERVATION_CHECK_FLAG = _Flag([False])


class conservation_check:
    """Context manager: every rule application inside the block is recorded; ``__enter__``
    returns the :class:`lrp_kernels.tools.check.ConservationReport`."""

    def __init__(self, rtol: float = 1e-3, atol: float = 0.0, module: Optional[torch.nn.Module] = None) -> None:
        self._cm = _check.conservation(rtol=rtol, atol=atol, module=module)
        self.report = None

    def __enter__(self):
        self.report = self._cm.__enter__()
        return self.report

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def conservation_check_wrap(backward: Callable) -> Callable:
    """Decorator for the ``backward(ctx, *out_relevance)`` of a custom relevance-view autograd
    Function: while a check is active, the relevance in and out of it is recorded (its name is
    the Function's). Outside a check it costs one flag read."""
    @functools.wraps(backward)
    def wrapped(ctx, *out_relevance):
        result = backward(ctx, *out_relevance)
        if _check.active():
            grads = result if isinstance(result, tuple) else (result,)
            tensors = [g for g in grads if isinstance(g, torch.Tensor)]
            name = getattr(backward, "__qualname__", "backward").rsplit(".", 1)[0]
            _check.record(name, None, tensors, None, [r for r in out_relevance if r is not None],
                          relevance_view=True, expected=True)
        return result
    return wrapped

