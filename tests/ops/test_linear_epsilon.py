"""Epsilon rule for a linear layer (lrp_kernels.ops.linear_epsilon): every view (relevance
drop-in, gradient drop-in, ``LinearEpsilon`` module in both views) on every backend (torch;
triton through the interpreter on CPU) against the float64 oracle, the module's ``nn.Linear``
contract, bad input, and the Triton kernel itself.

``TestLinearEpsilon`` runs the common op contract (tests/helpers/contract.py) on this op's cases; the
functions below it are this op's own tests.

Case table, views and tolerances: tests/helpers/cases.py; kernel-level inputs and tolerances:
tests/helpers/kernels.py. Kernel calls go through a NaN-poisoned allocator (``poison``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrp_kernels
import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import modules as M
from lrp_kernels.backends import dispatch

from helpers import oracle as O
from helpers.cases import OPS, bad, check_bias_absorbs_relevance, gen_for, rand, rel_err
from helpers.contract import OpContract
from helpers.kernels import GPU_DTYPES, TOL as KERNEL_TOL, dyadic, gauss, gpu, needs_triton, triton_call

pytestmark = pytest.mark.usefixtures("fixed_triton_config")


# ---- the common op contract on this op's cases (tests/helpers/contract.py) --------------------------

class TestLinearEpsilon(OpContract):
    """Runs the common op contract (helpers/contract.py) on NAMES; the functions below are this op's own tests."""
    NAMES = OPS["linear_epsilon"]
    BAD_INPUTS = [  # (call on a view module, exception type, words the message must contain)
        (lambda V: V.linear_epsilon(bad(2, 5), bad(3, 4)), ValueError, ["in_features", "x"]),
        (lambda V: V.linear_epsilon(bad(2, 4), bad(3, 4), bad(4)), ValueError, ["bias", "(3,)"]),
        (lambda V: V.linear_epsilon(bad(2, 4), bad(3, 4, 1)), ValueError, ["weight", "2-D"]),
        (lambda V: V.linear_epsilon(torch.ones(2, 4, dtype=torch.int64), bad(3, 4)), TypeError, ["x", "floating"]),
        (lambda V: V.linear_epsilon(bad(2, 4), bad(3, 4, device="meta")), ValueError, ["device", "weight"]),
        (lambda V: V.linear_epsilon(bad(2, 4), bad(3, 4), None, -1e-3), ValueError, ["epsilon"]),
        (lambda V: V.linear_epsilon(bad(2, 4), bad(3, 4), backend="cuda"), ValueError, ["backend"]),
    ]


# ---- the rule's own properties ---------------------------------------------------------------------

def test_bias_absorbs_relevance():
    check_bias_absorbs_relevance("linear_bias")


def test_linear_weight_and_bias_get_no_relevance():
    gen = gen_for("wgrad")
    x = rand(gen, (4, 6), torch.float64)
    w = rand(gen, (3, 6), torch.float64)
    b = rand(gen, (3,), torch.float64)
    F.linear_epsilon(x, w, b).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


def test_recompute_gives_the_same_relevance():
    gen = gen_for("recompute")
    x = rand(gen, (2, 5, 9), torch.float32, "transposed")
    w = rand(gen, (4, 9), torch.float32, grad=False)
    b = rand(gen, (4,), torch.float32, grad=False)
    grads = []
    for recompute in (False, True):
        y = F.linear_epsilon(x, w, b, recompute=recompute)
        y.backward(y.detach())
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    # and both are the oracle's, with R_z = z (its own float64 z; well-conditioned in float32)
    want = O.linear_epsilon_R(x, w, b, O.linear_z(x, w, b), 1e-6)
    for got in grads:
        assert rel_err(got, want) <= 1e-5


# ---- the module: an nn.Linear ---------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_epsilon_is_an_nn_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(9, 5, bias=bias, dtype=torch.float64)
    mod = M.LinearEpsilon(9, 5, bias=bias, dtype=torch.float64)
    assert isinstance(mod, nn.Linear)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in mod.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    mod.load_state_dict(ref.state_dict())
    ref.load_state_dict(mod.state_dict())
    x = rand(gen_for("lin-mod", bias), (2, 3, 9), torch.float64, "transposed")
    torch.testing.assert_close(mod(x), ref(x), rtol=0, atol=0)
    y = mod(x)
    y.backward(y.detach())
    want = O.linear_epsilon_R(x, ref.weight, ref.bias, y.detach(), mod.epsilon)
    assert rel_err(x.grad, want) <= 1e-10
    assert "epsilon=" in repr(mod)


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_parameters(bias):
    lin = nn.Linear(6, 4, bias=bias).eval()
    mod = M.LinearEpsilon.from_linear(lin, epsilon=1e-4)
    assert mod.weight is lin.weight
    assert (mod.bias is lin.bias) if bias else mod.bias is None
    assert list(mod.state_dict()) == list(lin.state_dict())
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in lin.named_parameters()]
    assert mod.training == lin.training
    assert (mod.in_features, mod.out_features, mod.epsilon) == (6, 4, 1e-4)
    with torch.no_grad():
        lin.weight.mul_(2)  # no copy: changes show through
    x = torch.randn(3, 6)
    torch.testing.assert_close(mod(x), lin(x), rtol=0, atol=0)


def test_linear_epsilon_gradient_view_and_deepcopy():
    mod = M.LinearEpsilon(7, 3, dtype=torch.float64, relevance=False)
    x = rand(gen_for("lin-g"), (4, 7), torch.float64)
    start = torch.ones(4, 3, dtype=torch.float64)
    mod(x).backward(start)
    want = O.linear_epsilon_G(x, mod.weight, mod.bias, start, mod.epsilon)
    assert rel_err(x.grad, want) <= 1e-10
    twin = copy.deepcopy(mod)
    assert twin.weight is not mod.weight and torch.equal(twin.weight, mod.weight)
    assert (twin.epsilon, twin.relevance) == (mod.epsilon, mod.relevance)


# ---- bad input: clear errors -------------------------------------------------------------------

def test_mixed_dtypes_raise():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="weight is torch.float64"):
        F.linear_epsilon(x, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias is torch.bfloat16"):
        G.linear_epsilon(x, torch.randn(3, 4), torch.zeros(3, dtype=torch.bfloat16))


# ---- the Triton kernel (linear_epsilon_backward) ----------------------------------------------------

LINEAR_CASES = [  # (x shape, N): odd sizes, batched leading dims, M = 1
    ((37, 29), 45),
    ((2, 5, 29), 45),
    ((1, 33), 17),
]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("x_shape,n", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_vs_oracle(poison, relevance, x_shape, n, with_bias):
    gen = torch.Generator().manual_seed(hash((x_shape, n, relevance, with_bias)) % 2**31)
    k = x_shape[-1]
    x, w = dyadic(*x_shape, gen=gen), dyadic(n, k, gen=gen)
    b = dyadic(n, gen=gen) if with_bias else None
    g = gauss(*x_shape[:-1], n, gen=gen)
    z = torch.nn.functional.linear(x, w, b)
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    want = (O.linear_epsilon_R if relevance else O.linear_epsilon_G)(x, w, b, g, 1e-6)
    assert len(poison) == 1
    assert rel_err(got, want) < KERNEL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_linear_vs_torch_noncontiguous(poison, relevance, recompute):
    gen = torch.Generator().manual_seed(11 + relevance + 2 * recompute)
    m, n, k = 37, 45, 29
    x = gauss(m, 2 * k, gen=gen)[:, ::2]            # strided columns
    w = gauss(k, n, gen=gen).t()                     # transposed weight [N, K]
    b = gauss(n, gen=gen)
    g = gauss(n, m, gen=gen).t()                     # column-major grad
    z = None if recompute else torch.nn.functional.linear(x, w, b)
    assert not (x.is_contiguous() or w.is_contiguous() or g.is_contiguous())
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    want = dispatch.call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance, backend="torch")
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) < KERNEL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
def test_swapped_tile_variant(poison, monkeypatch, relevance):
    """The SWAP_AB config (transposed tile W^T @ h^T, autotuned on GPU) gives the same result
    (the matmul kernel's half of this check is in test_matmul.py; same draws)."""
    from lrp_kernels.backends.triton import linear_epsilon as lin
    for name in ("INTERPRET_CONFIG", "FIXED_CONFIG"):
        monkeypatch.setitem(getattr(lin, name), "SWAP_AB", True)
    gen = torch.Generator().manual_seed(13 + relevance)
    x, w, b = dyadic(2, 37, 29, gen=gen), dyadic(45, 29, gen=gen), dyadic(45, gen=gen)
    g = gauss(2, 37, 45, gen=gen)
    z = torch.nn.functional.linear(x, w, b)
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    want = (O.linear_epsilon_R if relevance else O.linear_epsilon_G)(x, w, b, g, 1e-6)
    assert rel_err(got, want) < KERNEL_TOL[torch.float32]


@needs_triton
def test_linear_zero_z_is_finite(poison):
    """z == 0 exactly: stab(0) = +eps, never 0 (no inf / NaN)."""
    gen = torch.Generator().manual_seed(3)
    x, w = gauss(5, 16, gen=gen), gauss(20, 16, gen=gen)
    z = torch.nn.functional.linear(x, w)
    z[:, :4] = 0.0
    g = gauss(5, 20, gen=gen) * 1e-6
    got = triton_call("linear_epsilon_backward", g, x, w, None, z, 1e-6, True)
    want = dispatch.call("linear_epsilon_backward", g, x, w, None, z, 1e-6, True, backend="torch")
    assert rel_err(got, want) < KERNEL_TOL[torch.float32]


@needs_triton
def test_linear_public_api_both_views_agree(poison):
    """functional (R-view) and grad (G-view) drop-ins on the triton backend: R_x == x * G_x."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = dyadic(7, 24, gen=gen), dyadic(19, 24, gen=gen), dyadic(19, gen=gen)
    with lrp_kernels.use_backend("triton"):
        xr = x.clone().requires_grad_()
        y = lrp_kernels.functional.linear_epsilon(xr, w, b)
        y.backward(y.detach())
        xg = x.clone().requires_grad_()
        y2 = lrp_kernels.grad.linear_epsilon(xg, w, b)
        y2.backward(torch.ones_like(y2))
    assert len(poison) == 2
    want = O.linear_epsilon_R(x, w, b, y.detach(), 1e-6)
    assert rel_err(xr.grad, want) < KERNEL_TOL[torch.float32]
    assert rel_err(x * xg.grad, want) < KERNEL_TOL[torch.float32]


# ---- CUDA (run by the GPU job: pytest -m gpu) --------------------------------------------------------

@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("relevance", [True, False])
def test_gpu_linear(poison, dtype, relevance):
    gen = torch.Generator().manual_seed(101)
    m, n, k = 777, 1000, 515
    x = dyadic(3, m, k, gen=gen).to(dtype)
    w = (dyadic(n, k, gen=gen) / 8).to(dtype)
    b = dyadic(n, gen=gen).to(dtype)
    z = torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype)
    g = gauss(3, m, n, gen=gen, dtype=dtype)
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    assert got.dtype == dtype and got.is_cuda
    # oracle on the z the kernel saw (rounded to dtype): the rule is applied to that z
    zd = z.double()
    h = g.double() / O.stab(zd, 1e-6)
    if not relevance:
        h = h * zd
    want = h @ w.double()
    if relevance:
        want = want * x.double()
    assert rel_err(got, want) < KERNEL_TOL[dtype]


@pytest.mark.parametrize("share_output", [False, True])
def test_gradient_view_keeps_no_input_and_optionally_the_output_itself(share_output):
    """Gradient view, torch path: nothing x-sized is saved; with share_output the one saved
    activation is z itself (no memory when the next op saves z anyway), else a factor of z."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w, g = torch.randn(3, 7, dtype=torch.float64, generator=gen), torch.randn(4, 3, dtype=torch.float64, generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = G.linear_epsilon(x, w, None, 1e-3, share_output=share_output)
    activations = [t for t in saved if t.shape == z.shape]
    assert not any(t.shape == x.shape for t in saved)
    assert len(activations) == 1
    assert (activations[0].untyped_storage().data_ptr() == z.untyped_storage().data_ptr()) is share_output
    z.backward(g)
    assert rel_err(x.grad, O.linear_epsilon_G(x, w, None, g, 1e-3)) < 1e-12
