"""Builds the public drop-in functions once per view (relevance or gradient).

:mod:`lrp_kernels.ops.functional` and :mod:`lrp_kernels.ops.grad` are the same functions over the same
rule implementations (:mod:`lrp_kernels.ops`); only the ``relevance`` flag differs, so they
are made here from one definition rather than written twice.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from . import elementwise as _ew
from . import linear_epsilon as _lin
from . import matmul as _mm
from . import norm as _norm
from . import softmax as _sm
from ._common import DEFAULT_EPSILON, refuse_gradient_view_inputs

NAMES = ("linear_epsilon", "add2", "add", "mul2", "matmul", "softmax", "rms_norm_identity",
         "layer_norm", "mean", "normalize", "identity", "stop_relevance")


def build(relevance_view: bool) -> dict:
    """The drop-in functions with ``relevance=relevance_view``, keyed by name."""
    def linear_epsilon(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       epsilon: float = DEFAULT_EPSILON, *, backend: Optional[str] = None,
                       recompute: bool = False, share_output: bool = False) -> torch.Tensor:
        """``F.linear``; backward ``R_x = x * ((R_z / stab(z)) @ W)``."""
        return _lin.linear_epsilon(x, weight, bias, epsilon, relevance=relevance_view, backend=backend,
                                   recompute=recompute, share_output=share_output)

    def add2(a: torch.Tensor, b: torch.Tensor, *, epsilon: float = DEFAULT_EPSILON,
             backend: Optional[str] = None) -> torch.Tensor:
        """``a + b``; backward ``R_a = a * R_z / stab(z)``, ``R_b = b * R_z / stab(z)``."""
        return _ew.add(a, b, epsilon=epsilon, relevance=relevance_view, backend=backend)

    def add(*inputs: torch.Tensor, epsilon: float = DEFAULT_EPSILON, backend: Optional[str] = None) -> torch.Tensor:
        """n-ary epsilon add."""
        return _ew.add(*inputs, epsilon=epsilon, relevance=relevance_view, backend=backend)

    def mul2(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
        """``a * b``; backward ``R_a = R_b = R_z / 2`` (all to one factor if the other is constant)."""
        return _ew.mul(a, b, relevance=relevance_view, backend=backend)

    def matmul(a: torch.Tensor, b: torch.Tensor, *, epsilon: float = DEFAULT_EPSILON,
               backend: Optional[str] = None) -> torch.Tensor:
        """``torch.matmul``; backward uniform-epsilon: ``N = R_O/(2 stab(O))``, ``R_A = A*(N@B^T)``, ``R_B = B*(A^T@N)``."""
        return _mm.matmul(a, b, epsilon, relevance=relevance_view, backend=backend)

    def softmax(x: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None, temperature: float = 1.0, *,
                backend: Optional[str] = None) -> torch.Tensor:
        """``softmax(x / T)``; backward Deep Taylor with bias ``R_x = (x/T) * (R_s - s * sum(R_s))``."""
        return _sm.softmax(x, dim, dtype, temperature, relevance=relevance_view, backend=backend)

    def rms_norm_identity(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
                          backend: Optional[str] = None,
                          forward_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """RMSNorm; backward identity ``R_x = R_y`` (``forward_fn``: a module's own forward gives the values)."""
        return _norm.rms_norm_identity(x, weight, eps, relevance=relevance_view, backend=backend,
                                       forward_fn=forward_fn)

    def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, *, epsilon: float = DEFAULT_EPSILON, backend: Optional[str] = None,
                   forward_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """LayerNorm; backward: epsilon on the centring and the bias, identity on the scaling."""
        return _norm.layer_norm(x, weight, bias, eps, epsilon, relevance=relevance_view, backend=backend,
                                forward_fn=forward_fn)

    def mean(x: torch.Tensor, dim=None, keepdim: bool = False, *, epsilon: float = DEFAULT_EPSILON,
             backend: Optional[str] = None) -> torch.Tensor:
        """``x.mean(dim)``; backward ``R_x = x * expand(R_z / stab(z)) / n``."""
        return _ew.mean(x, dim, keepdim, epsilon, relevance=relevance_view, backend=backend)

    def normalize(x: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
        """``F.normalize`` (same defaults: ``dim=1``); backward identity."""
        return _norm.normalize(x, p, dim, eps, relevance=relevance_view)

    def identity(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, epsilon: float = DEFAULT_EPSILON,
                 backend: Optional[str] = None) -> torch.Tensor:
        """``fn(x)`` for element-wise ``fn``; backward identity ``R_x = R_y``."""
        return _ew.identity(fn, x, epsilon, relevance=relevance_view, backend=backend)

    stop_relevance = _ew.stop_relevance
    loc = locals()
    fns = {name: loc[name] for name in NAMES}
    if relevance_view:  # never silently mixed with a gradient-view patch's output
        fns = {name: _refusing_gradient_view_outputs(name, fn) if name != "stop_relevance" else fn
               for name, fn in fns.items()}
    return fns


def _refusing_gradient_view_outputs(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        refuse_gradient_view_inputs(name, list(args) + list(kwargs.values()))
        return fn(*args, **kwargs)
    return checked


def publish(namespace: dict, relevance_view: bool) -> None:
    """Put the built functions into a module's namespace, named as that module's own."""
    for name, fn in build(relevance_view).items():
        if fn.__module__ == __name__:
            fn.__module__, fn.__qualname__ = namespace["__name__"], name
            inner = getattr(fn, "__wrapped__", None)
            if inner is not None:
                inner.__module__, inner.__qualname__ = namespace["__name__"], name
        namespace[name] = fn
