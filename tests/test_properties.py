"""Property-based tests (Hypothesis) of the drop-ins, the attention block and the patch: random
shapes (0-size and 1-element dims included), strides, masks (padding, causal, windows, fully
masked rows, -inf and the dtype's minimum) and epsilons, against the float64 oracle and the
invariants (no NaN/Inf on finite input, zero relevance on masked keys and padding rows, batched
== alone, checkpointing changes nothing, remove() restores bit-identical outputs).

Profiles (tests/conftest.py): ``ci`` (default: few examples, derandomised, so CI is fast and
repeatable) and ``dev`` for local runs (``LRP_HYPOTHESIS_PROFILE=dev``: many random examples).
Tolerances: float64 everywhere here (norm-wise relative 1e-9), where the oracle is exact
enough that any difference is a bug, not rounding.
"""
from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st

import lrp_kernels
import lrp_kernels.functional as lf
import lrp_kernels.grad as lg
from helpers import oracle as O
from helpers.models import build, make_inputs, relevance

F64 = torch.float64
TOL = 1e-9

dims = st.integers(0, 3)              # batch-like dims: 0-size and 1-element included
features = st.integers(1, 6)
epsilons = st.sampled_from([1e-9, 1e-6, 1e-3, 0.1])
seeds = st.integers(0, 2**31 - 1)


def rel(a, b):
    a, b = a.detach().to(F64), b.detach().to(F64)
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randn(gen, *shape, strided=False):
    """float64 tensor; ``strided``: the same values seen through a transposed buffer."""
    if strided and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=F64)
        return t.transpose(-1, -2)
    return torch.randn(*shape, generator=gen, dtype=F64)


@given(batch=st.lists(dims, min_size=0, max_size=2), k=features, n=features, bias=st.booleans(),
       strided=st.booleans(), eps=epsilons, seed=seeds)
def test_linear_epsilon_both_views_match_the_oracle(batch, k, n, bias, strided, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, *batch, k, strided=strided)
    w = randn(gen, n, k, strided=strided)
    b = randn(gen, n) if bias else None
    g = randn(gen, *batch, n)
    for view, want in ((lf, O.linear_epsilon_R), (lg, O.linear_epsilon_G)):
        xi = x.detach().clone().requires_grad_()
        view.linear_epsilon(xi, w, b, eps).backward(g)
        assert xi.grad.shape == x.shape and torch.isfinite(xi.grad).all()
        assert rel(xi.grad, want(x, w, b, g, eps)) < TOL


@given(rows=st.lists(dims, min_size=1, max_size=2), width=st.integers(1, 7), seed=seeds,
       masked=st.sampled_from(["none", "neg_inf", "dtype_min"]), full_row=st.booleans(),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_softmax_masks_never_give_nan_and_masked_entries_get_nothing(rows, width, seed, masked, full_row,
                                                                    temperature):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, *rows, width)
    mask = torch.rand(x.shape, generator=gen) < 0.4
    if full_row and x.numel():
        mask.view(-1, width)[0] = True  # one fully masked row
    fill = {"none": None, "neg_inf": float("-inf"), "dtype_min": torch.finfo(F64).min}[masked]
    if fill is not None:
        x = x.masked_fill(mask, fill)
    r = randn(gen, *rows, width)
    xi = x.clone().requires_grad_()
    s = lf.softmax(xi, -1, temperature=temperature)
    s.backward(r)
    assert torch.isfinite(xi.grad).all()
    if fill is not None:
        assert (xi.grad[mask] == 0).all()
    else:
        assert rel(xi.grad, O.softmax_R(x, r, dim=-1, T=temperature)) < TOL


@given(a_batch=st.lists(st.integers(1, 3), max_size=2), b_batch_same=st.booleans(), m=features, k=features,
       n=features, eps=epsilons, seed=seeds)
def test_matmul_both_views_match_the_oracle(a_batch, b_batch_same, m, k, n, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    a = randn(gen, *a_batch, m, k)
    b = randn(gen, *(a_batch if b_batch_same else []), k, n)  # broadcast when not the same
    g = randn(gen, *torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), m, n)
    for view, want in ((lf, O.matmul_any_R), (lg, O.matmul_any_G)):
        ai, bi = a.clone().requires_grad_(), b.clone().requires_grad_()
        view.matmul(ai, bi, epsilon=eps).backward(g)
        ra, rb = want(a, b, g, eps)
        assert rel(ai.grad, ra) < TOL and rel(bi.grad, rb) < TOL


@st.composite
def attention_cases(draw):
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n, m, d = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 4)))
    pad = draw(st.integers(0, m))  # left padding of the first batch row (all keys when pad == m)
    return dict(b=b, hkv=hkv, hq=hkv * group, n=n, m=m, d=d, causal=causal, window=window, pad=pad,
                impl=draw(st.sampled_from(["eager", "chunked"])), eps=draw(epsilons), seed=draw(seeds),
                cp=draw(st.booleans()))


@given(case=attention_cases())
def test_attention_block_matches_the_oracle_and_its_invariants(case):
    c = case
    gen = torch.Generator().manual_seed(c["seed"])
    q = randn(gen, c["b"], c["hq"], c["n"], c["d"])
    k = randn(gen, c["b"], c["hkv"], c["m"], c["d"])
    v = randn(gen, c["b"], c["hkv"], c["m"], c["d"])
    keep = torch.ones(c["b"], c["m"], dtype=torch.bool)
    keep[0, :c["pad"]] = False
    g_o = randn(gen, c["b"], c["hq"], c["n"], c["d"])
    rule = "cp-lrp" if c["cp"] else "attnlrp"

    def run(qq, kk, vv, kp, go):
        qq, kk, vv = (t.clone().requires_grad_() for t in (qq, kk, vv))
        o = lrp_kernels.attnlrp_attention(qq, kk, vv, kp, is_causal=c["causal"], sliding_window=c["window"],
                                          epsilon=c["eps"], rule=rule, impl=c["impl"], block_size=2)
        o.backward(go)
        # CP-LRP: Q and K get no relevance (eager: no gradient at all, fused: zeros)
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (qq, kk, vv)]
        return (o.detach(), *grads)

    o, gq, gk, gv = run(q, k, v, keep, g_o)
    for t in (o, gq, gk, gv):
        assert torch.isfinite(t).all()
    allowed = O.attention_allowed(c["b"], c["hq"], c["n"], c["m"], c["causal"], c["window"], keep)
    want = O.attention_G(q, k, v, g_o, c["d"] ** -0.5, c["eps"], allowed=allowed, cp=c["cp"])
    for got, ref in zip((o, gq, gk, gv), want):
        assert rel(got, ref) < TOL
    assert (gk[0, :, :c["pad"]] == 0).all() and (gv[0, :, :c["pad"]] == 0).all()  # masked keys
    if c["b"] == 2:  # batched == each row alone
        alone = run(q[1:], k[1:], v[1:], keep[1:], g_o[1:])
        for batched, single in zip((o, gq, gk, gv), alone):
            assert rel(batched[1:], single) < TOL


@given(family=st.sampled_from(["llama", "qwen2", "gpt2", "bert"]), n=st.integers(3, 9),  # >= 1 real token per row
       pad=st.sampled_from(["left", "right"]), seed=seeds)
def test_patch_invariants(family, n, pad, seed):
    """No NaN; relevance 0 on padding; checkpointing changes nothing; remove() restores the
    unpatched outputs bit for bit."""
    model, kind = build(family)
    if kind == "causal" and pad == "right":
        pad = "left"  # decoders explain the last position: they pad on the left
    if kind == "encoder":
        pad = "right"
    inputs = make_inputs(model, kind, n=n, pad=pad, seed=seed % 1000)
    with torch.no_grad():
        before = model(**inputs).logits
    with lrp_kernels.patch(model):
        rel_plain, _ = relevance(model, kind, inputs)
        if hasattr(model, "gradient_checkpointing_enable") and model.supports_gradient_checkpointing:
            twin = copy.deepcopy(model)  # an unpatched copy: patch it with checkpointing on
    r = rel_plain["inputs_embeds"]
    assert torch.isfinite(r).all()
    padding = inputs["attention_mask"] == 0
    assert (r[padding] == 0).all()
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, before)

    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin.train()  # checkpointing is active in training mode (dropout is off while patched)
    with lrp_kernels.patch(twin):
        rel_ckpt, _ = relevance(twin, kind, inputs)
    assert rel(rel_ckpt["inputs_embeds"], r) < 1e-12
