"""Uniform-epsilon matmul (lrp_kernels.ops.matmul): every view (relevance drop-in, gradient
drop-in, ``MatmulUE`` module in both views) on every backend (torch; triton through the
interpreter on CPU, where it takes the shapes) against the float64 oracle, bad input, and the
Triton kernel itself (fallback for broadcast batches included).

``TestMatmul`` runs the common op contract (tests/helpers/contract.py) on this op's cases; the
functions below it are this op's own tests.

Case table, views and tolerances: tests/helpers/cases.py; kernel-level inputs and tolerances:
tests/helpers/kernels.py. Kernel calls go through a NaN-poisoned allocator (``poison``).
"""
from __future__ import annotations

import pytest
import torch

import lrp_kernels
import lrp_kernels.functional as F
from lrp_kernels import modules as M
from lrp_kernels.backends import dispatch

from helpers import oracle as O
from helpers.cases import OPS, bad, gen_for, rand, rel_err
from helpers.contract import OpContract
from helpers.kernels import DEV, GPU_DTYPES, TOL as KERNEL_TOL, dyadic, gauss, gpu, needs_triton, triton_call

pytestmark = pytest.mark.usefixtures("fixed_triton_config")


# ---- the common op contract on this op's cases (tests/helpers/contract.py) --------------------------

class TestMatmul(OpContract):
    """Runs the common op contract (helpers/contract.py) on NAMES; the functions below are this op's own tests."""
    NAMES = OPS["matmul"]
    BAD_INPUTS = [  # (call on a view module, exception type, words the message must contain)
        (lambda V: V.matmul(bad(2, 3), bad(4, 5)), ValueError, ["contraction"]),
        (lambda V: V.matmul(bad(2, 3, 4), bad(3, 4, 5)), ValueError, ["batch", "broadcast"]),
        (lambda V: V.matmul(bad(2, 3), torch.tensor(2.0)), ValueError, ["at least 1 dim"]),
        (lambda V: V.matmul(bad(2, 3), bad(3, 2), epsilon=-1.0), ValueError, ["epsilon"]),
        (lambda V: V.matmul(bad(2, 3), bad(3, 2, device="meta")), ValueError, ["device"]),
    ]


# ---- the module ------------------------------------------------------------------------------------

@pytest.mark.parametrize("relevance", [True, False])
def test_matmul_ue_module(relevance):
    """``MatmulUE`` (broadcast batch, non-contiguous operand) against the oracle in its view."""
    gen = gen_for("wrappers", relevance)
    a = rand(gen, (2, 4, 5), torch.float64, "transposed")
    c = rand(gen, (2, 5, 3), torch.float64)
    out = M.MatmulUE(epsilon=1e-5, relevance=relevance)(a, c)
    torch.testing.assert_close(out, a @ c, rtol=0, atol=0)
    start = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(start)
    want = (O.matmul_R if relevance else O.matmul_G)(a, c, start, 1e-5)
    for got, w in zip((a.grad, c.grad), want):
        assert rel_err(got, w) <= 1e-10


# ---- bad input: clear errors -------------------------------------------------------------------

def test_mixed_dtypes_raise():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="b is torch.float64"):
        F.matmul(x, torch.randn(4, 3, dtype=torch.float64))


# ---- the Triton kernel (matmul_ue_backward) ---------------------------------------------------------

MATMUL_CASES = [  # (a shape, b shape)
    ((37, 29), (29, 45)),
    ((2, 3, 37, 16), (2, 3, 16, 45)),   # attention-like [B, H, N, d] @ [B, H, d, N]
    ((1, 33, 17), (1, 17, 5)),
]
NEEDS = [(True, True), (True, False), (False, True)]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("a_shape,b_shape", MATMUL_CASES)
@pytest.mark.parametrize("need_a,need_b", NEEDS)
def test_matmul_vs_oracle(poison, relevance, a_shape, b_shape, need_a, need_b):
    gen = torch.Generator().manual_seed(hash((a_shape, relevance, need_a, need_b)) % 2**31)
    a, b = dyadic(*a_shape, gen=gen), dyadic(*b_shape, gen=gen)
    o = a @ b
    g = gauss(*o.shape, gen=gen)
    ga, gb = triton_call("matmul_ue_backward", g, a, b, o, 1e-6, relevance, need_a, need_b)
    share = 2.0 if (need_a and need_b) else 1.0
    wa, wb = (O.matmul_R if relevance else O.matmul_G)(a, b, g, 1e-6, share)
    assert len(poison) == need_a + need_b
    assert (ga is None) == (not need_a) and (gb is None) == (not need_b)
    if need_a:
        assert rel_err(ga, wa) < KERNEL_TOL[torch.float32]
    if need_b:
        assert rel_err(gb, wb) < KERNEL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_matmul_vs_torch_noncontiguous(poison, relevance, recompute):
    gen = torch.Generator().manual_seed(31 + relevance + 2 * recompute)
    q = gauss(2, 37, 3, 16, gen=gen).transpose(1, 2)      # [B, H, N, d] from [B, N, H, d]
    k_t = gauss(2, 3, 45, 16, gen=gen).transpose(-1, -2)  # K^T as a view
    o = None if recompute else q @ k_t
    g = gauss(2, 3, 45, 37, gen=gen).transpose(-1, -2)
    got = triton_call("matmul_ue_backward", g, q, k_t, o, 1e-6, relevance, True, True)
    want = dispatch.call("matmul_ue_backward", g, q, k_t, o, 1e-6, relevance, True, True,
                         backend="torch")
    for t, w in zip(got, want):
        assert rel_err(t, w) < KERNEL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
def test_swapped_tile_variant(poison, monkeypatch, relevance):
    """The SWAP_AB config (transposed tile, autotuned on GPU) gives the same result (the linear
    kernel's half of this check is in test_linear_epsilon.py; same draws)."""
    from lrp_kernels.backends.triton import linear_epsilon as lin
    for name in ("INTERPRET_CONFIG", "FIXED_CONFIG"):
        monkeypatch.setitem(getattr(lin, name), "SWAP_AB", True)
    gen = torch.Generator().manual_seed(13 + relevance)
    dyadic(2, 37, 29, gen=gen), dyadic(45, 29, gen=gen), dyadic(45, gen=gen)  # the linear half's x, w, b
    g = gauss(2, 37, 45, gen=gen)
    a, bb = dyadic(2, 37, 16, gen=gen), dyadic(2, 16, 45, gen=gen)
    ga, gb = triton_call("matmul_ue_backward", g, a, bb, a @ bb, 1e-6, relevance, True, True)
    wa, wb = (O.matmul_R if relevance else O.matmul_G)(a, bb, g, 1e-6)
    assert rel_err(ga, wa) < KERNEL_TOL[torch.float32] and rel_err(gb, wb) < KERNEL_TOL[torch.float32]


@needs_triton
def test_matmul_public_api_uses_triton(poison):
    gen = torch.Generator().manual_seed(41)
    a = dyadic(2, 9, 16, gen=gen).requires_grad_()
    b = dyadic(2, 16, 11, gen=gen).requires_grad_()
    with lrp_kernels.use_backend("triton"):
        o = lrp_kernels.functional.matmul(a, b)
        o.backward(o.detach())
    wa, wb = O.matmul_R(a, b, o.detach(), 1e-6)
    assert len(poison) == 2
    assert rel_err(a.grad, wa) < KERNEL_TOL[torch.float32] and rel_err(b.grad, wb) < KERNEL_TOL[torch.float32]


@needs_triton
def test_broadcast_matmul_falls_back_with_reason():
    a, b = torch.randn(2, 3, 5, 4, device=DEV), torch.randn(4, 6, device=DEV)
    g = torch.randn(2, 3, 5, 6, device=DEV)
    args = (g, a, b, None, 1e-6, True, True, True)
    from lrp_kernels.backends.triton.matmul_ue import supports
    assert "broadcast" in supports(*args)
    with pytest.raises(dispatch.BackendUnavailableError, match="broadcast"):
        with lrp_kernels.use_backend("triton"):
            dispatch.call("matmul_ue_backward", *args)
    assert dispatch.resolve("matmul_ue_backward", *args)[0] in ("torch", "cpp")


# ---- CUDA (run by the GPU job: pytest -m gpu) --------------------------------------------------------

@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("relevance", [True, False])
def test_gpu_matmul_attention_shapes(poison, dtype, relevance):
    gen = torch.Generator().manual_seed(7)
    q = dyadic(2, 4, 333, 64, gen=gen).to(dtype)
    k_t = dyadic(2, 4, 64, 333, gen=gen).to(dtype).contiguous()
    o = (q.float() @ k_t.float()).to(dtype)
    g = gauss(2, 4, 333, 333, gen=gen, dtype=dtype)
    ga, gb = triton_call("matmul_ue_backward", g, q, k_t, o, 1e-6, relevance, True, True)
    od = o.double()
    h = g.double() / (2 * O.stab(od, 1e-6))
    if not relevance:
        h = h * od
    wa, wb = h @ k_t.double().transpose(-1, -2), q.double().transpose(-1, -2) @ h
    if relevance:
        wa, wb = wa * q.double(), wb * k_t.double()
    assert rel_err(ga, wa) < KERNEL_TOL[dtype] and rel_err(gb, wb) < KERNEL_TOL[dtype]
