"""Stacked drop-ins (an MLP block and an attention block): the relevance view
(lrp_kernels.functional) equals the gradient view (lrp_kernels.grad, ``R_t == t * t.grad`` with
the backward started from ones), and on CUDA both equal a float64 relevance-view run. Each op
on its own is checked against the float64 oracle in its file of tests/ops/.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF

import lrp_kernels.functional as F
import lrp_kernels.grad as G

from helpers.cases import cuda, gen_for, rand, rel_err


# ---- stacked networks: relevance view == gradient view -------------------------------------------

def _params(gen, dtype, d=12, hidden=20, out=7):
    def w(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return {
        "w_in": w(d, d, scale=d ** -0.5), "b_in": w(d, scale=0.1),
        "norm": (torch.rand(d, generator=gen) + 0.5).to(dtype),
        "w_gate": w(hidden, d, scale=d ** -0.5), "w_up": w(hidden, d, scale=d ** -0.5),
        "w_down": w(d, hidden, scale=hidden ** -0.5),
        "w_q": w(d, d, scale=d ** -0.5), "w_k": w(d, d, scale=d ** -0.5), "w_v": w(d, d, scale=d ** -0.5),
        "w_out": w(out, d, scale=d ** -0.5),
    }


def mlp_block(V, x, p, eps=1e-6, plain_residual=False):
    """linear -> rmsnorm -> identity(silu) gate * up -> linear -> residual add."""
    h = V.linear_epsilon(x, p["w_in"], p["b_in"], eps)
    n = V.rms_norm_identity(h, p["norm"], 1e-6)
    gate = V.identity(tF.silu, V.linear_epsilon(n, p["w_gate"], None, eps), epsilon=eps)
    up = V.linear_epsilon(n, p["w_up"], None, eps)
    y = V.linear_epsilon(V.mul2(gate, up), p["w_down"], None, eps)
    # in the gradient view a residual sum needs no rule (SPEC): plain + must agree too
    return h + y if plain_residual else V.add2(h, y, epsilon=eps)


def attention_block(V, x, p, eps=1e-6, heads=3):
    """q, k, v projections -> matmul -> softmax (scale as temperature) -> matmul -> linear."""
    b, t, d = x.shape
    hd = d // heads

    def split(u):  # [b, t, d] -> [b, heads, t, hd]: a reshape/transpose, no rule needed
        return u.reshape(b, t, heads, hd).transpose(1, 2)
    q, k, v = (split(V.linear_epsilon(x, p[n], None, eps)) for n in ("w_q", "w_k", "w_v"))
    scores = V.matmul(q, k.transpose(-1, -2), epsilon=eps)
    probs = V.softmax(scores, -1, temperature=math.sqrt(hd))
    o = V.matmul(probs, v, epsilon=eps).transpose(1, 2).reshape(b, t, d)
    return V.linear_epsilon(o, p["w_out"], None, eps)


def _both_views(net, dtype, layout, plain_residual=False, seed=""):
    """Input relevance of ``net`` in both views. The views agree up to rounding and
    O(eps / |x|) terms of the identity rule, so float64 runs with eps ~ 0."""
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    gen = gen_for("net", net.__name__, str(dtype), layout, seed)
    p = _params(gen, dtype)
    x = rand(gen, (2, 5, 12), dtype, layout)
    xr = x.detach().clone().requires_grad_()
    out_r = net(F, xr, p, eps)
    out_r.backward(out_r.detach())          # relevance view: R_out = out
    xg = x.detach().clone().requires_grad_()
    kw = {"plain_residual": True} if plain_residual else {}
    out_g = net(G, xg, p, eps, **kw)
    out_g.backward(torch.ones_like(out_g))  # gradient view: G_out = 1, so R_out = out
    torch.testing.assert_close(out_r, out_g)
    return xr.grad, xg.detach() * xg.grad


@pytest.mark.parametrize("layout", ["contig", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("net", [mlp_block, attention_block], ids=lambda f: f.__name__)
def test_network_relevance_view_equals_gradient_view(net, dtype, layout):
    r_view, g_view = _both_views(net, dtype, layout)
    assert torch.isfinite(r_view).all() and torch.isfinite(g_view).all()
    assert r_view.abs().sum() > 0
    # the two views differ only in rounding and O(eps / |x|) terms of the identity rule
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    err = rel_err(r_view, g_view)
    assert err <= tol, f"relevance view vs gradient view: rel err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradient_view_residual_needs_no_rule(dtype):
    r_view, g_view = _both_views(mlp_block, dtype, "contig", plain_residual=True)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    assert rel_err(r_view, g_view) <= tol


def test_network_bf16_views_agree_loosely():
    r_view, g_view = _both_views(mlp_block, torch.bfloat16, "transposed")
    assert rel_err(r_view, g_view) <= 5e-2


def test_network_views_differ_when_a_rule_is_missing():
    """The comparison above can fail: plain (unpatched) mul in the gradient view double-counts."""
    gen = gen_for("missing")
    p = _params(gen, torch.float64)
    x = rand(gen, (2, 5, 12), torch.float64)

    def net_plain_mul(V, x):
        gate = V.identity(tF.silu, V.linear_epsilon(x, p["w_gate"], None, 1e-12), epsilon=1e-12)
        return V.linear_epsilon(gate * V.linear_epsilon(x, p["w_up"], None, 1e-12), p["w_down"], None, 1e-12)

    def net_rule_mul(V, x):
        gate = V.identity(tF.silu, V.linear_epsilon(x, p["w_gate"], None, 1e-12), epsilon=1e-12)
        return V.linear_epsilon(V.mul2(gate, V.linear_epsilon(x, p["w_up"], None, 1e-12)), p["w_down"],
                                None, 1e-12)
    xr = x.detach().clone().requires_grad_()
    out = net_rule_mul(F, xr)
    out.backward(out.detach())
    grads = {}
    for name, net in (("rule", net_rule_mul), ("plain", net_plain_mul)):
        xg = x.detach().clone().requires_grad_()
        net(G, xg).backward(torch.ones(2, 5, 12, dtype=torch.float64))
        grads[name] = xg.detach() * xg.grad
    assert rel_err(xr.grad, grads["rule"]) <= 1e-8
    assert rel_err(xr.grad, grads["plain"]) > 0.1


# ---- CUDA (run by the GPU job: pytest -m gpu) --------------------------------------------------------

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("view", ["R", "G"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("net", [mlp_block, attention_block], ids=lambda f: f.__name__)
def test_cuda_networks_match_float64_reference(net, dtype, view):
    gen = gen_for("cuda-net", net.__name__, str(dtype))
    p = _params(gen, dtype)
    x = torch.randn(2, 5, 12, generator=gen).to(dtype)
    p64 = {k: v.double() for k, v in p.items()}
    x64 = x.double().requires_grad_()
    ref = net(F, x64, p64)
    ref.backward(ref.detach())
    pc = {k: v.cuda() for k, v in p.items()}
    xc = x.cuda().requires_grad_()
    out = net(F if view == "R" else G, xc, pc)
    out.backward(out.detach() if view == "R" else torch.ones_like(out))
    rel = xc.grad if view == "R" else xc.detach() * xc.grad
    err = rel_err(rel.cpu(), x64.grad)
    tol = 1e-2 if dtype == torch.float32 else 5e-2  # whole network; fp32: TF32 dots allowed
    assert err <= tol, f"{net.__name__} {dtype} {view}: rel err {err:.3g}"
