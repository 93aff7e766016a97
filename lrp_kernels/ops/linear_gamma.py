r"""Gamma rule for a linear layer ``z = x @ W.T + b`` (Montavon et al. 2019), both output signs.

With ``W+ = max(W, 0)``, ``W- = min(W, 0)`` (likewise ``x+``, ``x-``, ``b+``, ``b-``),
``Wp = W + gamma W+`` and ``Wn = W + gamma W-``::

    den_p = x+ @ Wp.T + x- @ Wn.T + b + gamma b+      # outputs z >= 0: positive contributions enlarged
    den_n = x+ @ Wn.T + x- @ Wp.T + b + gamma b-      # outputs z <  0: negative contributions enlarged
    case = sign of z: of the given z, else of den_p + den_n (= (2 + gamma) z when the rule's bias is the layer's)
    g_p = [z >= 0] R_z / stab(den_p),   g_n = [z < 0] R_z / stab(den_n)
    A = g_p @ Wp + g_n @ Wn,   B = g_p @ Wn + g_n @ Wp

Relevance view: ``R_x = x+ * A + x- * B``.
``z`` is the layer's actual output: pass it when the rule's bias differs from the layer's
(``zero_params="bias"``), since the case follows the original output's sign.
Gradient view (``R_z = G_z * z``, ``z = (den_p + den_n) / (2 + gamma)`` when not given): ``G_x = A`` where ``x > 0``, ``B`` where ``x < 0``, ``A + B`` at
``x = 0`` (the derivative of ``x+ A + x- B`` with ``A, B`` held constant, as the generic
:class:`lrp_kernels.hooks.core.BasicHook` computes it). ``gamma = 0`` is the epsilon rule.

This is the op ``linear_gamma_backward(grad_z, x, weight, bias, z, gamma, epsilon, relevance)``
used by :class:`lrp_kernels.hooks.rules.Gamma` on ``nn.Linear``; the torch backend below is four
GEMMs per pass, the triton backend (``lrp_kernels/backends/triton/linear_gamma.py``) fuses the sign
splits, the stabiliser and the selection into two kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import dispatch
from ._common import compute_dtype, stabilize


def linear_gamma_backward_torch(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    gamma: float,
    epsilon: float,
    relevance: bool,
) -> torch.Tensor:
    """Reference backend (float32 or higher)."""
    cd = compute_dtype(grad_z, x, weight)
    xc, w = x.to(cd), weight.to(cd)
    wp, wn = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
    xp, xn = xc.clamp(min=0), xc.clamp(max=0)
    den_p = xp @ wp.T + xn @ wn.T
    den_n = xp @ wn.T + xn @ wp.T
    if bias is not None:
        b = bias.to(cd)
        den_p = den_p + (b + gamma * b.clamp(min=0))
        den_n = den_n + (b + gamma * b.clamp(max=0))
    total = den_p + den_n
    r = grad_z.to(cd)
    if not relevance:
        r = r * (total / (2.0 + gamma) if z is None else z.to(cd))
    positive = (total if z is None else z.to(cd)) >= 0
    zero = torch.zeros((), dtype=cd, device=x.device)
    gp = torch.where(positive, r / stabilize(den_p, epsilon), zero)
    gn = torch.where(positive, zero, r / stabilize(den_n, epsilon))
    a = gp @ wp + gn @ wn
    bb = gp @ wn + gn @ wp
    if relevance:
        out = xp * a + xn * bb
    else:
        out = torch.where(xc > 0, a, torch.where(xc < 0, bb, a + bb))
    return out.to(x.dtype)


dispatch.register("linear_gamma_backward", "torch", linear_gamma_backward_torch)


def linear_gamma_backward(grad_z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], z: Optional[torch.Tensor], gamma: float,
                          epsilon: float, relevance: bool, *, backend: Optional[str] = None) -> torch.Tensor:
    """The gamma rule's backward for ``nn.Linear`` (``R_x`` or ``G_x`` from ``grad_z``), on the
    backend the dispatcher picks (fused Triton kernels on CUDA)."""
    return dispatch.call("linear_gamma_backward", grad_z, x, weight, bias, z, gamma, epsilon, relevance,
                         backend=backend)
