"""LXT's conventions, translated onto our rules.

* **The stabiliser.** Our rules divide by ``stab(z) = z + eps * sgn(z)`` (docs/math.md: a
  negative output is moved away from zero, never across it); LXT divides by ``z + eps``
  whatever the sign. :func:`lxt_stabiliser` makes one of our rules divide by LXT's denominator
  instead: a gradient hook on the rule's output multiplies the incoming relevance by
  ``stab(z) / (z + eps)`` before our backward divides it by ``stab(z)``. Where ``z >= 0`` the
  factor is exactly 1.
* **Splits counted over every tensor input** (LXT's uniform rule), where ours count only the
  inputs that receive relevance: :func:`scale_relevance`.
* **Rules around plain functions**: :class:`CallableModule` gives a callable the ``nn.Module``
  our rules wrap.
* **Positional flags**: :func:`check_inplace` (LXT's ``inplace`` is accepted, validated and
  not needed: our kernels never need to overwrite the incoming relevance to save memory).
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ...ops._common import compute_dtype, stabilize

Number = Union[int, float]


def scale_relevance(out, factor: Callable[[torch.Tensor], Union[torch.Tensor, float]]):
    """Multiply the relevance arriving at every tensor of ``out`` by ``factor(value)`` before the
    rule that made it propagates it. The factor is taken now, from the forward value, so later
    in-place changes of ``out`` do not move it."""
    def hook_one(t):
        if not (isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()):
            return t
        cd = compute_dtype(t)
        f = factor(t.detach().to(cd))
        t.register_hook(lambda g: (g.to(cd) * f).to(g.dtype))
        return t
    if not torch.is_grad_enabled():
        return out
    return tree_map(hook_one, out)


def lxt_stabiliser(out, epsilon: float, ours: float = None):
    """Make the rule that produced ``out`` divide by LXT's ``z + epsilon`` instead of our
    ``stab(z)``; ``ours`` is the epsilon the rule was called with (default ``epsilon``)."""
    ours = epsilon if ours is None else ours
    return scale_relevance(out, lambda z: stabilize(z, ours) / (z + epsilon))


def check_inplace(inplace) -> None:
    """LXT's ``inplace`` flag: a bool. Anything else is an error, so that an epsilon passed in
    its place (our main API's third positional argument) is never taken for a flag."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool (LXT's third positional argument; pass epsilon= by keyword), "
                        f"got {inplace!r}")


def as_tensor_like(value, like: torch.Tensor) -> torch.Tensor:
    """Python numbers (``mul2(x, -1)``) as constant tensors of ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a tensor or a number, got {type(value).__name__}")
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


class CallableModule(nn.Module):
    """An ``nn.Module`` that calls ``fn``: LXT's rules wrap functions as well as modules."""

    def __init__(self, fn: Callable) -> None:
        if not callable(fn):
            raise TypeError(f"a rule wraps an nn.Module or a callable, got {type(fn).__name__}")
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def as_module(module_or_fn) -> nn.Module:
    return module_or_fn if isinstance(module_or_fn, nn.Module) else CallableModule(module_or_fn)


def function_class(fn: Callable, name: str) -> type:
    """A class with ``apply = fn``: LXT's ``*_fn`` autograd Functions are called as
    ``linear_epsilon_fn.apply(...)``; here they are the public functions under that spelling."""
    return type(name, (), {"apply": staticmethod(fn), "__doc__": f"``{name}.apply(...)`` is "
                           f":func:`{fn.__module__}.{fn.__name__}` (LXT's spelling)."})
