"""LXT's explicit drop-in functions (``lxt.explicit.functional``), relevance view.

Forward equals the plain op; backward propagates relevance (``y.backward(y)``, then
``x.grad`` is the relevance). Each function is :mod:`lrp_kernels.ops.functional` with LXT's
signature, defaults and conventions:

* ``inplace`` is LXT's third positional argument of ``add2`` / ``matmul`` / ``mul2`` (and the
  last of ``softmax``); it must be a bool and changes nothing (our kernels do not need to
  overwrite the incoming relevance). Our main API has no ``inplace`` and takes ``epsilon``
  by keyword.
* LXT's stabiliser ``z + eps`` (ours keeps the sign, ``z + eps * sgn(z)``, so a negative
  output is never pushed across zero; see :mod:`lrp_kernels.compat.lxt._conventions`).
* LXT's defaults: ``epsilon=1e-8`` for ``add2`` and ``matmul`` (ours: ``1e-6``), ``dim=1`` for
  ``normalize`` (as ``F.normalize``).
* ``matmul`` with one constant operand: LXT still halves the relevance (the constant's half
  is lost); ours gives the whole relevance to the operand that receives it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ....ops import functional as _lf
from .check import CONSERVATION_CHECK_FLAG, conservation_check_wrap  # noqa: F401
from .._conventions import as_tensor_like, check_inplace, function_class, lxt_stabiliser

__all__ = ["add2", "softmax", "linear_epsilon", "matmul", "rms_norm_identity", "mul2", "mean",
           "layer_norm", "normalize", "CONSERVATION_CHECK_FLAG", "conservation_check_wrap"]


def add2(input_a: torch.Tensor, input_b: torch.Tensor, inplace: bool = False,
         epsilon: float = 1e-8) -> torch.Tensor:
    """``a + b`` with the epsilon rule: ``R_a = a * R / (a + b + eps)``, same for ``b``."""
    check_inplace(inplace)
    return lxt_stabiliser(_lf.add2(input_a, input_b, epsilon=epsilon), epsilon)


def softmax(input: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None, temperature: float = 1.0,
            inplace: bool = False) -> torch.Tensor:
    """``softmax(input / temperature)`` with Deep Taylor (with bias):
    ``R_x = (x / T) * (R - s * sum(R))`` (AttnLRP Prop. 3.1).

    ``temperature`` must be a number, not a bool: ``softmax(x, dim, dtype, False)`` in older
    LXT code meant ``inplace=False``; LXT 2.1 divides by ``False`` there (every output NaN),
    we refuse it. Masked logits follow our convention (``-inf`` and the dtype's minimum get
    zero relevance), see docs/compat-lxt.md.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r} (the fourth positional argument "
                        f"is the temperature; pass inplace= by keyword)")
    check_inplace(inplace)
    return _lf.softmax(input, dim, dtype, float(temperature))


def linear_epsilon(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   epsilon: float = 1e-6) -> torch.Tensor:
    """``F.linear`` with the epsilon rule: ``R_x = x * ((R / (z + eps)) @ W)`` (AttnLRP Eq. 8)."""
    return lxt_stabiliser(_lf.linear_epsilon(input, weight, bias, epsilon=epsilon), epsilon)


def matmul(input_a: torch.Tensor, input_b: torch.Tensor, inplace: bool = False,
           epsilon: float = 1e-8) -> torch.Tensor:
    """``a @ b`` with the uniform-epsilon rule: ``N = R / (2 z + eps)``, ``R_a = a * (N @ b^T)``,
    ``R_b = b * (a^T @ N)`` (AttnLRP Prop. 3.3), also when one operand is a constant."""
    check_inplace(inplace)
    if torch.is_grad_enabled() and input_a.requires_grad != input_b.requires_grad:
        # LXT halves the relevance whatever the operands; ours gives a lone operand all of it.
        # A throw-away leaf in place of the constant takes the other half, as in LXT.
        input_a, input_b = (t if t.requires_grad else t.detach().requires_grad_() for t in (input_a, input_b))
    # ours divides by 2 stab(z, eps/2) = 2z + eps*sgn(z): the same scale as LXT's 2z + eps
    return lxt_stabiliser(_lf.matmul(input_a, input_b, epsilon=epsilon / 2), epsilon / 2)


def rms_norm_identity(hidden_states: torch.Tensor, weight: torch.Tensor, variance_epsilon: float) -> torch.Tensor:
    """RMSNorm (``weight * x / rms(x)``) with the identity rule ``R_x = R_y`` (AttnLRP Prop. 3.4)."""
    return _lf.rms_norm_identity(hidden_states, weight, variance_epsilon)


def mul2(input_a: torch.Tensor, input_b: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``a * b`` with the uniform rule ``R_a = R_b = R / 2`` (AttnLRP Prop. 3.2); a factor that
    does not require grad, or a Python number, is a constant and the other gets all of it."""
    check_inplace(inplace)
    if not isinstance(input_a, torch.Tensor):
        input_a = as_tensor_like(input_a, input_b)
    input_b = as_tensor_like(input_b, input_a)
    return _lf.mul2(input_a, input_b)


def mean(x: torch.Tensor, dim, keep_dim: bool, epsilon: float = 1e-6) -> torch.Tensor:
    """``x.mean(dim, keep_dim)`` with the epsilon rule: ``R_x = x * R / (sum(x) + eps)``."""
    dims = [dim] if isinstance(dim, int) else list(range(x.dim())) if dim is None else list(dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    # ours divides by n * stab(mean, e): LXT's sum(x) + eps is n * (mean + eps / n)
    return lxt_stabiliser(_lf.mean(x, dim, keep_dim, epsilon=epsilon / n), epsilon / n)


def layer_norm(hidden_states: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               variance_epsilon: float) -> torch.Tensor:
    """LayerNorm over the last dim: epsilon rule on the centring and the bias, identity on the
    division by the standard deviation (``1e-6`` stabilises the rule, as in LXT).

    Ours states the rule per part, ``R_x = x * (n - mean(n))`` with
    ``n = (y - b) R / (stab(y) stab(c))``; LXT differentiates the layer with the standard
    deviation detached, which is the same up to the factor ``c / stab(c)`` (``c = x - mean(x)``).
    """
    return lxt_stabiliser(_lf.layer_norm(hidden_states, weight, bias, variance_epsilon, epsilon=1e-6), 1e-6)


def _layer_norm_slower(hidden_states: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       variance_epsilon: float) -> torch.Tensor:
    """:func:`layer_norm` spelt out with the drop-ins, one rule per part (LXT's test checks the
    fused rule against it): epsilon on ``x - mean(x)``, the standard deviation a constant,
    uniform (all to ``x``) on the constant scalings, epsilon on ``+ bias``."""
    centred = add2(hidden_states, mul2(mean(hidden_states, -1, True), -1))
    with torch.no_grad():
        std = (centred.pow(2).mean(-1, keepdim=True) + variance_epsilon).sqrt()
    y = mul2(centred, 1 / std)
    if weight is not None:
        y = mul2(y, weight)
    if bias is not None:
        y = add2(y, bias)
    return y


def normalize(input: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None) -> torch.Tensor:
    """``F.normalize`` (same defaults, ``dim=1``) with the identity rule (the norm is a constant)."""
    if out is not None:
        raise ValueError("normalize: out= is not supported (the result is a new tensor)")
    return _lf.normalize(input, p=p, dim=dim, eps=eps)


# LXT's autograd Functions, spelt as LXT code calls them (``softmax_fn.apply(x, dim, ...)``)
add2_tensors_fn = function_class(add2, "add2_tensors_fn")
softmax_fn = function_class(softmax, "softmax_fn")
linear_epsilon_fn = function_class(linear_epsilon, "linear_epsilon_fn")
matmul_fn = function_class(matmul, "matmul_fn")
rms_norm_identity_fn = function_class(rms_norm_identity, "rms_norm_identity_fn")
mul2_fn = function_class(mul2, "mul2_fn")
mean_fn = function_class(mean, "mean_fn")
layer_norm_grad_fn = function_class(layer_norm, "layer_norm_grad_fn")
normalize_identity_fn = function_class(normalize, "normalize_identity_fn")
