"""The AttnLRP attention block (lrp_kernels.ops.attention.attnlrp_attention): both views (gradient,
``relevance=True``), both rules (attnlrp, cp-lrp) on every implementation (eager and chunked: the
torch backend; flash: the Triton kernels) against the float64 oracle of the composed rules.

CPU: the Triton kernel runs through the interpreter (small shapes, fp32, blocks of 16, so
N = 37 / M = 45 exercise partial blocks). Tolerances: fp32 inputs vs the float64 oracle,
norm-wise relative 2e-5 (typical errors are 3e-7; the epsilon rule on ``O`` amplifies rounding
where an entry of ``O`` nearly cancels, so a rare random draw reaches 3e-5: seeds are fixed per
case); bf16 on GPU 3e-2, fp16 1e-2 (norm-wise, vs the float64 chunked backend on the same inputs).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from helpers import oracle
from lrp_kernels.backends import dispatch
from lrp_kernels.ops.attention import _Spec, attnlrp_attention

EPS = 1e-6


def triton_ok() -> bool:
    return dispatch.backend_status("triton")[0]


IMPLS = ["eager", "chunked", pytest.param("flash", marks=pytest.mark.skipif(
    "not __import__('lrp_kernels').backends.backend_status('triton')[0]", reason="triton unavailable"))]


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rand(*shape, gen, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# case name -> (B, Hq, Hkv, N, M, d, kwargs for the call, how to build the mask)
CASES = {
    "plain": (2, 2, 2, 37, 37, 16, {}, None),
    "causal": (2, 2, 2, 37, 37, 32, {"is_causal": True}, None),
    "causal_kv_cache": (1, 2, 2, 9, 45, 16, {"is_causal": True}, None),
    "causal_fewer_keys": (1, 4, 2, 45, 37, 16, {"is_causal": True}, None),  # first 8 rows see no key
    "pad_left": (2, 2, 2, 37, 37, 16, {"is_causal": True}, "left"),
    "pad_right": (2, 2, 2, 37, 37, 16, {}, "right"),
    "gqa": (2, 4, 2, 37, 45, 16, {}, None),
    "gqa_causal_pad": (2, 6, 2, 33, 33, 16, {"is_causal": True}, "left"),
    "window": (1, 2, 1, 45, 45, 16, {"is_causal": True, "sliding_window": 7}, None),
    "softcap": (1, 2, 2, 37, 37, 16, {"softcap": 3.0, "scale": 0.5}, None),
    "float_mask": (2, 2, 2, 37, 37, 64, {}, "float"),
    "head_mask": (1, 2, 1, 21, 37, 16, {}, "head_bool"),
    "odd_head_dim": (1, 2, 1, 21, 21, 24, {"is_causal": True}, None),
}


def build_case(name, gen, dtype=torch.float32, device="cpu"):
    B, Hq, Hkv, N, M, dim, kw, mk = CASES[name]
    q, k, v = rand(B, Hq, N, dim, gen=gen), rand(B, Hkv, M, dim, gen=gen), rand(B, Hkv, M, dim, gen=gen)
    keep = None
    mask = None
    bias = None
    if mk in ("left", "right"):
        keep = torch.ones(B, M, dtype=torch.bool)
        n_pad = [5, 0, 3][:B] + [0] * max(0, B - 3)
        for b, p in enumerate(n_pad):
            if p:
                if mk == "left":
                    keep[b, :p] = False
                else:
                    keep[b, M - p:] = False
        mask = keep
    allowed = oracle.attention_allowed(B, Hq, N, M, kw.get("is_causal", False), kw.get("sliding_window"), keep)
    if mk == "float":
        # Hugging Face style [B, 1, N, M] additive mask: dtype min for masked, a finite bias elsewhere
        bias = 0.3 * rand(B, 1, N, M, gen=gen)
        dead = torch.rand(B, 1, N, M, generator=gen) < 0.3
        dead[0, 0, 4] = True  # a fully masked query row
        mask = torch.where(dead, torch.full_like(bias, torch.finfo(torch.float32).min), bias)
        allowed = allowed & ~dead.expand(B, Hq, N, M)
        bias = torch.where(dead, torch.zeros_like(bias), bias)
    if mk == "head_bool":
        mask = torch.rand(B, Hq, N, M, generator=gen) > 0.4
        mask[0, 1, 3] = False
        allowed = allowed & mask
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    if mask is not None:
        mask = mask.to(device)
    return cast(q), cast(k), cast(v), mask, kw, allowed, bias


def run(impl, q, k, v, mask, kw, grad, relevance=False, rule="attnlrp", block_size=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = attnlrp_attention(q, k, v, mask, impl=impl, relevance=relevance, rule=rule,
                          block_size=block_size, **kw)
    o.backward(grad(o) if callable(grad) else grad)
    zero = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
    return o, zero(q), zero(k), zero(v)


def check(got, want, tol):
    names = ("O", "G_Q", "G_K", "G_V")
    for n, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{n} has NaN/Inf"
        if b.abs().max() == 0:
            assert a.abs().max() == 0, f"{n} should be exactly 0"
            continue
        err = rel_err(a, b)
        assert err < tol, f"{n}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_view_matches_oracle(impl, case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v, mask, kw, allowed, bias = build_case(case, gen)
    g = rand(*q.shape[:3], v.shape[-1], gen=gen)
    scale = kw.get("scale", q.shape[-1] ** -0.5)
    want = oracle.attention_G(q, k, v, g, scale, EPS, allowed=allowed, bias=bias, softcap=kw.get("softcap"))
    got = run(impl, q, k, v, mask, kw, g, block_size=16)
    check(got, want, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["causal", "pad_left", "gqa_causal_pad", "window"])
def test_relevance_view_matches_oracle(impl, case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()) + 1)
    q, k, v, mask, kw, allowed, _ = build_case(case, gen)
    g = rand(*q.shape[:3], v.shape[-1], gen=gen)
    o_ref = oracle._attention_forward(q, k, v, q.shape[-1] ** -0.5, allowed, None, None)[-2]
    r_o = (o_ref * oracle.d(g)).float()  # a relevance that lives on O (R_O = O * G_O)
    want = oracle.attention_R(q, k, v, r_o, q.shape[-1] ** -0.5, EPS, allowed=allowed)
    got = run(impl, q, k, v, mask, kw, r_o, relevance=True, block_size=16)
    check(got, want, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("relevance", [False, True])
def test_cp_lrp(impl, relevance):
    gen = torch.Generator().manual_seed(7)
    q, k, v, mask, kw, allowed, _ = build_case("gqa_causal_pad", gen)
    g = rand(*q.shape[:3], v.shape[-1], gen=gen)
    scale = q.shape[-1] ** -0.5
    if relevance:
        o_ref = oracle._attention_forward(q, k, v, scale, allowed, None, None)[-2]
        g = (o_ref * oracle.d(g)).float()
        want = oracle.attention_R(q, k, v, g, scale, EPS, allowed=allowed, cp=True)
    else:
        want = oracle.attention_G(q, k, v, g, scale, EPS, allowed=allowed, cp=True)
    got = run(impl, q, k, v, mask, kw, g, relevance=relevance, rule="cp-lrp", block_size=16)
    check(got, want, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero_never_nan(impl):
    gen = torch.Generator().manual_seed(3)
    B, H, N, dim = 2, 2, 20, 16
    q, k, v = (rand(B, H, N, dim, gen=gen).requires_grad_() for _ in range(3))
    mask = torch.zeros(B, 1, N, N)
    mask[0, :, 2] = -math.inf  # one fully masked row (-inf)
    mask[1, :, 5] = torch.finfo(torch.float32).min  # one via the dtype minimum
    mask[1, :, :, 7] = -math.inf  # a masked key
    o, gq, gk, gv = run(impl, q, k, v, mask, {}, torch.ones(B, H, N, dim), block_size=16)
    for t in (o, gq, gk, gv):
        assert torch.isfinite(t).all()
    assert o[0, :, 2].abs().max() == 0 and o[1, :, 5].abs().max() == 0
    assert gq[0, :, 2].abs().max() == 0 and gq[1, :, 5].abs().max() == 0
    assert gk[1, :, 7].abs().max() == 0 and gv[1, :, 7].abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    """Q, K, V as Hugging Face makes them: [B, N, H, d] transposed to [B, H, N, d]."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N, dim = 2, 4, 2, 29, 16
    q = rand(B, N, Hq, dim, gen=gen).transpose(1, 2)
    k = rand(B, N, Hkv, dim, gen=gen).transpose(1, 2)
    v = rand(B, N, Hkv, dim, gen=gen).transpose(1, 2)
    g = rand(B, Hq, N, dim, gen=gen)
    allowed = oracle.attention_allowed(B, Hq, N, N, causal=True)
    want = oracle.attention_G(q, k, v, g, dim ** -0.5, EPS, allowed=allowed)
    got = run(impl, q, k, v, None, {"is_causal": True}, g, block_size=16)
    check(got, want, 2e-5)


@pytest.mark.skipif(not triton_ok(), reason="triton unavailable")
def test_flash_low_precision_code_path(monkeypatch):
    """The bf16 branch of the kernels (operands cast for the dots) runs and stays exact when the
    cast is a no-op (fp32 tensors): the interpreter cannot check bf16 arithmetic itself."""
    from lrp_kernels.backends.triton import flash_attnlrp

    monkeypatch.setattr(flash_attnlrp, "_lowp", lambda q: True)
    gen = torch.Generator().manual_seed(13)
    q, k, v, mask, kw, allowed, bias = build_case("gqa_causal_pad", gen)
    g = rand(*q.shape[:3], v.shape[-1], gen=gen)
    want = oracle.attention_G(q, k, v, g, q.shape[-1] ** -0.5, EPS, allowed=allowed)
    check(run("flash", q, k, v, mask, kw, g), want, 2e-5)


@pytest.mark.skipif(not triton_ok(), reason="triton unavailable")
@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
@pytest.mark.parametrize("case", ["causal_kv_cache", "causal_fewer_keys", "window", "gqa_causal_pad"])
def test_flash_unequal_blocks(monkeypatch, bm, bn, case):
    """The GPU uses BLOCK_M != BLOCK_N: the causal / window loop bounds must hold for those too."""
    from lrp_kernels.backends.triton import flash_attnlrp

    monkeypatch.setattr(flash_attnlrp, "_blocks", lambda d, kind: (bm, bn, 4, 1))
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v, mask, kw, allowed, bias = build_case(case, gen)
    g = rand(*q.shape[:3], v.shape[-1], gen=gen)
    want = oracle.attention_G(q, k, v, g, q.shape[-1] ** -0.5, EPS, allowed=allowed, bias=bias)
    check(run("flash", q, k, v, mask, kw, g), want, 2e-5)


@pytest.mark.skipif(not triton_ok(), reason="triton unavailable")
@pytest.mark.parametrize("fwd,bwd", [((128, 64), (64, 64)), ((128, 32), (64, 32))])
def test_flash_gpu_block_table_on_longer_rows(monkeypatch, fwd, bwd):
    """The GPU's block table (d <= 64 and d <= 128 rows) on a sequence spanning several blocks."""
    from lrp_kernels.backends.triton import flash_attnlrp

    monkeypatch.setattr(flash_attnlrp, "_blocks", lambda d, kind: (*(fwd if kind == "fwd" else bwd), 4, 1))
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, N, dim = 1, 4, 2, 150, 16
    q, k, v, g = (rand(B, h, N, dim, gen=gen) for h in (Hq, Hkv, Hkv, Hq))
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, :7] = False
    allowed = oracle.attention_allowed(B, Hq, N, N, causal=True, window=97, key_keep=keep)
    want = oracle.attention_G(q, k, v, g, dim ** -0.5, EPS, allowed=allowed)
    check(run("flash", q, k, v, keep, {"is_causal": True, "sliding_window": 97}, g), want, 2e-5)


def test_chunked_float64_is_exact():
    gen = torch.Generator().manual_seed(5)
    q, k, v, mask, kw, allowed, bias = build_case("gqa_causal_pad", gen, dtype=torch.float64)
    g = rand(*q.shape[:3], v.shape[-1], gen=gen, dtype=torch.float64)
    want = oracle.attention_G(q, k, v, g, q.shape[-1] ** -0.5, EPS, allowed=allowed)
    got = run("chunked", q, k, v, mask, kw, g, block_size=5)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        assert rel_err(a, b) < 1e-11


def test_auto_on_cpu_is_exact_for_small_and_large():
    gen = torch.Generator().manual_seed(9)
    B, H, dim = 1, 2, 16
    for N in (8, 200):  # eager below the size threshold, chunked above
        q, k, v = (rand(B, H, N, dim, gen=gen) for _ in range(3))
        g = rand(B, H, N, dim, gen=gen)
        allowed = oracle.attention_allowed(B, H, N, N, causal=True)
        want = oracle.attention_G(q, k, v, g, dim ** -0.5, EPS, allowed=allowed)
        got = run("auto", q, k, v, None, {"is_causal": True}, g)
        check(got, want, 2e-5)


def test_output_dtype_and_bad_inputs():
    q = torch.randn(1, 4, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    assert attnlrp_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), impl="chunked").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attnlrp_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="4-D"):
        attnlrp_attention(q[0], k, v)
    with pytest.raises(ValueError, match="rule"):
        attnlrp_attention(q, k, v, rule="lrp")
    with pytest.raises(ValueError, match="impl"):
        attnlrp_attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="attention_mask"):
        attnlrp_attention(q, k, v, torch.zeros(1, 1, 8, 5))
    with pytest.raises(TypeError, match="attention_mask"):
        attnlrp_attention(q, k, v, torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="sliding_window"):
        attnlrp_attention(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="head_dim"):
        attnlrp_attention(q, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))


# ---- GPU: bf16 / fp16 / bigger shapes (skipped without CUDA) --------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol,dim", [(torch.float32, 1e-4, 64), (torch.bfloat16, 3e-2, 128),
                                           (torch.float16, 1e-2, 64), (torch.bfloat16, 3e-2, 256)])
@pytest.mark.parametrize("setup", ["causal_gqa", "padded", "window_softcap"])
def test_gpu_flash_matches_float64(dtype, tol, dim, setup):
    gen = torch.Generator().manual_seed(dim)
    B, Hq, Hkv, N = 2, 8, 2, 1000
    q = rand(B, Hq, N, dim, gen=gen, dtype=dtype, device="cuda")
    k = rand(B, Hkv, N, dim, gen=gen, dtype=dtype, device="cuda")
    v = rand(B, Hkv, N, dim, gen=gen, dtype=dtype, device="cuda")
    g = rand(B, Hq, N, dim, gen=gen, dtype=dtype, device="cuda")
    mask, kw = None, {"is_causal": True}
    if setup == "padded":
        mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
        mask[0, :100] = False
        mask = mask[:, None, None, :].expand(B, 1, N, N) & torch.ones(N, N, dtype=torch.bool, device="cuda").tril()
        kw = {}
    if setup == "window_softcap":
        kw = {"is_causal": True, "sliding_window": 129, "softcap": 20.0}
    want = run("chunked", q.double(), k.double(), v.double(), mask, kw, g.double(), block_size=256)
    got = run("flash", q, k, v, mask, kw, g)
    for name, a, b in zip(("O", "G_Q", "G_K", "G_V"), got, want):
        assert a.dtype == dtype
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.gpu
@gpu
def test_gpu_auto_uses_flash_and_relevance_view():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (rand(1, 4, 300, 64, gen=gen, device="cuda") for _ in range(3))
    g = rand(1, 4, 300, 64, gen=gen, device="cuda")
    spec = _Spec(q, k, v, None, None, True, None, None, EPS, "attnlrp")
    assert dispatch.resolve("attnlrp_attention_forward", q, k, v, spec, None)[0] == "triton"
    for rel in (False, True):
        want = run("chunked", q.double(), k.double(), v.double(), None, {"is_causal": True}, g.double(), relevance=rel)
        got = run("auto", q, k, v, None, {"is_causal": True}, g, relevance=rel)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-4


# ---- the platform path: the platform kernel's own backward with the two rescalings -----------

@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "none"])
def test_platform_path_matches_the_oracle_within_its_bound(rule, mask_kind):
    """SDPA forward/backward + rescalings vs the float64 oracle of the exact rule: G_V (and all
    of CP-LRP) exact; G_Q, G_K within eps / (|S0| + eps) per score (tiny here: eps = 1e-9,
    unit-scale scores). GQA through SDPA's enable_gqa; a fully masked padding row included."""
    import torch.nn.functional as F

    from lrp_kernels.ops.attention import attnlrp_platform

    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N, d = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(B, h, N, d, generator=gen, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    g_o = torch.randn(B, Hq, N, d, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, N, dtype=torch.bool)
    if mask_kind == "padding":
        keep[0, :3] = False
    allowed = oracle.attention_allowed(B, Hq, N, N, causal=mask_kind == "causal", key_keep=keep)
    mask = None if mask_kind != "padding" else allowed

    def sdpa(q_, k_, v_):
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=mask_kind == "causal",
                                             enable_gqa=True)
        return torch.nan_to_num(out) if mask is not None else out  # SDPA: NaN for an all-masked row

    qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
    o = attnlrp_platform(sdpa, qi, ki, vi, epsilon=1e-9, rule=rule)
    o.backward(g_o)
    want = oracle.attention_G(q, k, v, g_o, d ** -0.5, 1e-9, allowed=allowed, cp=rule == "cp-lrp")
    live = allowed.any(-1, keepdim=True)  # rows with at least one key (padding rows: no relevance)
    assert rel_err(torch.where(live, o, 0.0), want[0]) < 1e-12
    for got, ref in zip((qi.grad, ki.grad, vi.grad), want[1:]):
        got = torch.zeros_like(ref) if got is None else got
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) < 1e-6
