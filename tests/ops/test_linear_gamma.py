"""Gamma rule for a linear layer (lrp_kernels.ops.linear_gamma, the ``linear_gamma_backward``
op): both views (relevance, gradient), through the op and through its user-facing form, the
``lrp_kernels.hooks.rules.Gamma`` hook on ``nn.Linear``, on every backend (torch; triton through
the interpreter on CPU) against the float64 oracle (``oracle.linear_gamma_R`` / ``_G``: the
explicit per-output contributions). The hook's other code paths (the generic BasicHook,
convolutions) are checked in tests/test_lrp_rules.py.

Tolerances (norm-wise relative): float64 1e-10 (1e-12 absolute element-wise for the formula
check), float32 1e-5, bf16 on GPU 2e-2.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrp_kernels
from lrp_kernels.backends import dispatch
from lrp_kernels.hooks import rules as R
from lrp_kernels.ops.linear_gamma import linear_gamma_backward_torch

from helpers import oracle as O
from helpers.cases import TRITON, rel_err

EPS = 1e-6
f64 = torch.float64


def _gamma_case(seed, shape=(2, 19, 45), n_out=29, bias=True, zeros=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    if zeros:
        x.view(-1, shape[-1])[0, :5] = 0.0
    W = torch.randn(n_out, shape[-1], generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    grad = torch.randn(*shape[:-1], n_out, generator=g).to(dtype)
    return grad, x, W, b


# ---- the op, torch backend, float64 ------------------------------------------------------------------

def test_linear_gamma_torch_op_matches_explicit_formula():
    """The op vs the per-output explicit formula (float64)."""
    grad, x, W, b = _gamma_case(12, shape=(5, 6), n_out=4, dtype=f64)
    got = linear_gamma_backward_torch(grad, x, W, b, None, 0.7, EPS, True)
    ref = O.linear_gamma_R(x, W, b, grad, 0.7, EPS)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 100.0])
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("bias,with_z", [(True, False), (False, False), (False, True)])
def test_op_matches_oracle(gamma, relevance, bias, with_z):
    """Both views, with and without the rule's bias, and with the layer's own output ``z`` given
    (the gradient view's ``R_z = G_z * z`` when the rule zeroes the layer's bias); inputs with
    exact zeros (the gradient view's one-sided derivatives add up there)."""
    grad, x, W, b = _gamma_case(3, dtype=f64)
    b_layer = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(4), dtype=f64)
    b_rule = b if bias else None
    z = torch.nn.functional.linear(x, W, b_layer) if with_z else None
    got = dispatch.call("linear_gamma_backward", grad, x, W, b_rule, z, gamma, EPS, relevance, backend="torch")
    if relevance:
        want = O.linear_gamma_R(x, W, b_rule, grad, gamma, EPS, z=z)
    else:
        want = O.linear_gamma_G(x, W, b_rule, grad, gamma, EPS, z=z)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert rel_err(got, want) <= 1e-10


# ---- the op, triton backend ----------------------------------------------------------------------------

@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_z", [False, True])
def test_linear_gamma_triton_matches_torch_and_float64(relevance, bias, with_z):
    """Odd sizes (not multiples of the tile), a non-contiguous x, exact zeros, both views."""
    if not dispatch.backend_status("triton")[0]:
        pytest.skip("triton backend unavailable")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    grad, x, W, b = (None if t is None else t.to(dev) for t in _gamma_case(11, bias=bias))
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    z = torch.nn.functional.linear(x, W, None if b is None else b * 0.5) if with_z else None
    args = (0.3, 1e-6, relevance)
    got = dispatch.call("linear_gamma_backward", grad, x, W, b, z, *args, backend="triton")
    chosen, _ = dispatch.resolve("linear_gamma_backward", grad, x, W, b, z, *args, backend="triton")
    assert chosen == "triton"  # the kernel ran, not a silent torch fallback
    ref64 = linear_gamma_backward_torch(grad.double(), x.double(), W.double(),
                                        None if b is None else b.double(), None if z is None else z.double(), *args)
    ref32 = linear_gamma_backward_torch(grad, x, W, b, z, *args)
    assert got.dtype == x.dtype and got.shape == x.shape and torch.isfinite(got).all()
    assert ((got.double() - ref64).norm() / ref64.norm()).item() < 1e-5
    assert ((ref32.double() - ref64).norm() / ref64.norm()).item() < 1e-5
    # and the independent oracle
    xc, Wc, bc, gc = (None if t is None else t.cpu() for t in (x, W, b, grad))
    want = (O.linear_gamma_R(xc, Wc, bc, gc, 0.3, 1e-6, z=None if z is None else z.cpu()) if relevance
            else O.linear_gamma_G(xc, Wc, bc, gc, 0.3, 1e-6, z=None if z is None else z.cpu()))
    assert rel_err(got, want) < 1e-5


# ---- the hook on nn.Linear: both views x every backend ----------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "auto", TRITON])
@pytest.mark.parametrize("view", ["R", "G"])
@pytest.mark.parametrize("zero_params", [None, "bias"])
def test_gamma_hook_matches_oracle(backend, view, zero_params):
    """``Gamma(0.25)`` on an ``nn.Linear`` (3-D batch, exact zeros in x). Relevance view:
    ``R_y = y * G`` (relevance proportional to the activation); gradient view: ``G_y = G``
    and ``R_y = y * G`` with ``y`` the layer's actual output (bias included even where the rule
    zeroes it). The case (which sign gamma enlarges) follows the sign of that actual output in both
    views. float64 on torch / auto, float32 on triton (the interpreter)."""
    dtype = torch.float32 if backend == "triton" else f64
    grad, x, W, b = _gamma_case(21, dtype=dtype)
    layer = nn.Linear(W.shape[1], W.shape[0]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    relevance = view == "R"
    handle = R.Gamma(0.25, EPS, zero_params=zero_params, relevance=relevance).register(layer)
    try:
        xr = x.clone().requires_grad_()
        with lrp_kernels.use_backend(backend):
            y = layer(xr)
            y.backward(y.detach() * grad if relevance else grad)
    finally:
        handle.remove()
    b_rule = None if zero_params else b
    y64 = torch.nn.functional.linear(x.double(), W.double(), b.double())
    if relevance:
        want = O.linear_gamma_R(x, W, b_rule, y64 * grad.double(), 0.25, EPS, z=y64)
    else:
        want = O.linear_gamma_G(x, W, b_rule, grad, 0.25, EPS, z=y64)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert xr.grad.dtype == dtype
    assert rel_err(xr.grad, want) <= tol


# ---- CUDA ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("relevance", [True, False])
def test_linear_gamma_triton_on_cuda(dtype, tol, relevance):
    """fp32: IEEE dots, 1e-5 norm-wise; bf16: TF32 dots on fp32-converted operands and a bf16
    result, 2e-2 norm-wise, against float64 on the same (rounded) inputs."""
    grad, x, W, b = (t.cuda() for t in _gamma_case(13, shape=(3, 67, 200), n_out=130, dtype=dtype))
    got = dispatch.call("linear_gamma_backward", grad, x, W, b, None, 0.25, 1e-6, relevance, backend="triton")
    ref = linear_gamma_backward_torch(grad.double(), x.double(), W.double(), b.double(), None, 0.25, 1e-6, relevance)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol
