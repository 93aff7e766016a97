"""The fused gated-MLP rule (ops.elementwise.gated_product, what patches use) equals the composed SPEC rules (float64 oracle):
identity rule on the activation, then the uniform rule on the product."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF

from helpers import oracle
from lrp_kernels.ops import elementwise
from lrp_kernels.ops.elementwise import gated_product

EPS = 1e-6


@pytest.mark.parametrize("act", [tF.silu, tF.gelu, torch.tanh])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["strided", "blocks"])
def test_gated_product_matches_identity_then_uniform(act, need, dtype, tol, layout, monkeypatch):
    """``strided``: a non-contiguous ``g`` (one pass); ``blocks``: contiguous inputs in blocks of
    7 elements (a block boundary inside every row of 10, and a short last block)."""
    gen = torch.Generator().manual_seed(hash((act.__name__, need)) % 2**31)
    g = torch.randn(3, 5, 19, generator=gen, dtype=dtype)[:, :, ::2]  # non-contiguous, odd size
    if layout == "blocks":
        g = g.contiguous()
        monkeypatch.setattr(elementwise, "GATED_BACKWARD_BLOCK", 7)
        blocks = []
        block_fn = elementwise._gated_product_backward_block
        monkeypatch.setattr(elementwise, "_gated_product_backward_block",
                            lambda *a: (blocks.append(1), block_fn(*a)))
    u = torch.randn(3, 5, 10, generator=gen, dtype=dtype)
    g_m = torch.randn(3, 5, 10, generator=gen, dtype=dtype)
    g.requires_grad_(need[0])
    u.requires_grad_(need[1])
    out = gated_product(g, u, act, EPS)
    assert torch.equal(out, act(g) * u)
    out.backward(g_m)
    if layout == "blocks":
        assert len(blocks) == -(-g.numel() // 7)  # every block ran once

    s = act(g.detach().double())
    Gs, Gu = oracle.mul_G(s, u, g_m, a_const=not need[0], b_const=not need[1])
    if need[1]:
        assert (u.grad.double() - Gu).norm() <= tol * Gu.norm()
    if need[0]:
        Gg = oracle.identity_G(act, g, Gs, EPS)
        assert (g.grad.double() - Gg).norm() <= tol * Gg.norm()
