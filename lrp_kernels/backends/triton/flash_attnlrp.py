r"""Flash-AttnLRP: the fused attention rule of docs/math.md ("The attention block, fused") in Triton,
never holding an N x M matrix (ops ``attnlrp_attention_forward`` / ``attnlrp_attention_backward``;
public API and the torch backend: :mod:`lrp_kernels.ops.attention`).

Forward (one program per query block and head): online softmax over key blocks; saves only
``O`` and the row log-sum-exp ``lse`` (``+inf`` for a fully masked row, so ``exp(S - lse) = 0``
there and never NaN).

Backward, gradient view, with ``H = G_O * O / (2 stab(O))`` and ``D = rowsum(H * O)`` (both
O(N d), computed first in PyTorch) and ``P = exp(S - lse)`` recomputed per block::

    G_V = P^T @ H
    G_S = P * (H @ V^T - D)                    (Deep-Taylor softmax, gradient form)
    G_S <- G_S * tanh(x) / stab(x)             (soft-cap only, x = scale * S0 / softcap)
    T   = G_S * S0 / (2 stab(S0))              (uniform-epsilon on S0 = Q @ K^T)
    G_Q = scale * T @ K,   G_K = scale * T^T @ Q

Two kernels and no atomics: ``_dq_kernel`` (one program per query block and query head) and
``_dkv_kernel`` (one program per key block and key/value head, looping over the query heads of
its GQA group, so the group sum happens in registers). Relevance view: ``H = R_O / (2 stab(O))``
and each result is multiplied by its input at the end. ``cp-lrp`` skips ``G_Q``, ``G_K`` and uses
``H = G_O * O / stab(O)``.

Masks: causal and sliding window from indices (blocks outside them are skipped), plus an
optional bool / additive float mask read through its strides (a broadcast dim has stride 0, so a
``[B, M]`` key-padding mask is never expanded). Precision: fp32 inputs use IEEE fp32 dots;
bf16 inputs run the dots in bf16 with fp32 accumulation (intermediates ``P``, ``H``, ``T`` are
rounded to bf16 for the dots, as in flash attention); fp16 inputs use fp32 (TF32) dots.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import dispatch
from .. import triton as _backend
from . import stabilize

MAX_HEAD_DIM = 256


@triton.jit
def _tanh(x):
    """tanh in fp32 without cancellation near 0 (series there, exp form elsewhere)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.05, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b; LOWP: operands already bf16 (fast path), else fp32 operands."""
    if LOWP:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)


@triton.jit
def _logits(q, k, offs_m, offs_n, N, M, OFFSET, WINDOW, scale, softcap,
            MASK, stride_mm, stride_mn, mask_min,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
            MASK_KIND: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """S0 = Q K^T, the masked logits S (-inf where masked) and tanh(x) of the soft-cap."""
    s0 = _dot(q, tl.trans(k), LOWP, PRECISION)
    s = s0 * scale
    y = s
    if SOFTCAP:
        y = _tanh(s / softcap)
        s = y * softcap
    valid = (offs_n[None, :] < M) & (offs_m[:, None] < N)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
    if HAS_WINDOW:
        valid = valid & (offs_m[:, None] + OFFSET - offs_n[None, :] < WINDOW)
    # int64 rows: an [N, M] mask passes 2**31 elements at N = M = 46k
    if MASK_KIND == 1:  # bool, True = attend
        mv = tl.load(MASK + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn,
                     mask=valid, other=0)
        valid = valid & (mv != 0)
    if MASK_KIND == 2:  # additive float, <= dtype min means masked
        mv = tl.load(MASK + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn,
                     mask=valid, other=0.0).to(tl.float32)
        valid = valid & (mv > mask_min)
        s = s + tl.where(valid, mv, 0.0)
    s = tl.where(valid, s, float("-inf"))
    return s0, s, y


@triton.jit
def _load_kv(Kb, Vb, offs_n, offs_d, offs_dv, skn, skd, svn, svd, M, D, DV):
    """One key block's K and V tiles (rows past ``M`` / dims past ``D``, ``DV`` read as 0)."""
    k = tl.load(Kb + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(Vb + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
    return k, v


@triton.jit
def _key_range(m0, BLOCK_M: tl.constexpr, M, OFFSET, WINDOW,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys [lo, hi) that query rows [m0, m0 + BLOCK_M) may attend to."""
    lo = 0
    hi = M
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + OFFSET)
    if HAS_WINDOW:
        lo = tl.maximum(lo, m0 + OFFSET - WINDOW + 1)
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, MASK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    smb, smh, smm, smn,
    N, M, HQ, G, OFFSET, WINDOW, scale, softcap, mask_min,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    LOWP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    Mb = MASK + b * smb + h * smh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BDV), tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, M, OFFSET, WINDOW, CAUSAL, HAS_WINDOW)
    lo = (lo // BLOCK_N) * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(Kb, Vb, offs_n, offs_d, offs_dv, skn, skd, svn, svd, M, D, DV)
        s0, s, y = _logits(q, k, offs_m, offs_n, N, M, OFFSET, WINDOW, scale, softcap,
                           Mb, smm, smn, mask_min, CAUSAL, HAS_WINDOW, SOFTCAP, MASK_KIND,
                           LOWP, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if LOWP:
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + _dot(p, v, LOWP, PRECISION)
        m_i = m_new
    alive = l_i > 0.0
    o = acc / tl.where(alive, l_i, 1.0)[:, None]
    lse = tl.where(alive, m_i + tl.log(tl.where(alive, l_i, 1.0)), float("inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _dq_kernel(
    Q, K, V, H, DS, LSE, GQ, MASK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn,
    N, M, HQ, G, OFFSET, WINDOW, scale, softcap, mask_min, eps,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    RELEVANCE: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hk = h // G
    row0 = bh.to(tl.int64) * N  # H, DS, LSE, GQ are contiguous [B, HQ, N, *]
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_m = offs_m < N
    qmask = in_m[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    hh = tl.load(H + (row0 + offs_m[:, None]) * DV + offs_dv[None, :],
                 mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if LOWP:
        hh = hh.to(q.dtype)
    dsum = tl.load(DS + row0 + offs_m, mask=in_m, other=0.0)
    lse = tl.load(LSE + row0 + offs_m, mask=in_m, other=float("inf"))
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    Mb = MASK + b * smb + h * smh
    dq = tl.zeros((BLOCK_M, BD), tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, M, OFFSET, WINDOW, CAUSAL, HAS_WINDOW)
    lo = (lo // BLOCK_N) * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(Kb, Vb, offs_n, offs_d, offs_dv, skn, skd, svn, svd, M, D, DV)
        s0, s, y = _logits(q, k, offs_m, offs_n, N, M, OFFSET, WINDOW, scale, softcap,
                           Mb, smm, smn, mask_min, CAUSAL, HAS_WINDOW, SOFTCAP, MASK_KIND,
                           LOWP, PRECISION)
        p = tl.exp(s - lse[:, None])
        gs = p * (_dot(hh, tl.trans(v), LOWP, PRECISION) - dsum[:, None])
        if SOFTCAP:
            gs = gs * y / stabilize(s0 * (scale / softcap), eps)
        t = gs * s0 / (2.0 * stabilize(s0, eps))
        if LOWP:
            t = t.to(k.dtype)
        dq += _dot(t, k, LOWP, PRECISION)
    dq = dq * scale
    if RELEVANCE:
        dq = dq * q.to(tl.float32)
    tl.store(GQ + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
             dq.to(GQ.dtype.element_ty), mask=qmask)


@triton.jit
def _dkv_kernel(
    Q, K, V, H, DS, LSE, GK, GV, MASK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn,
    N, M, HQ, HKV, G, OFFSET, WINDOW, scale, softcap, mask_min, eps,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    ATTN: tl.constexpr, RELEVANCE: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_n = offs_n < M
    kmask = in_n[:, None] & (offs_d[None, :] < D)
    vmask = in_n[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=vmask, other=0.0)
    dk = tl.zeros((BLOCK_N, BD), tl.float32)
    dv = tl.zeros((BLOCK_N, BDV), tl.float32)
    # query rows [lo, hi) that may attend to keys [n0, n0 + BLOCK_N)
    lo = 0
    hi = N
    if CAUSAL:
        lo = tl.maximum(lo, n0 - OFFSET)
    if HAS_WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + WINDOW - OFFSET)
    lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        row0 = (b * HQ + h) * N
        Qb = Q + b * sqb + h * sqh
        Mb = MASK + b * smb + h * smh
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_m = offs_m < N
            q = tl.load(Qb + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                        mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
            hh = tl.load(H + (row0 + offs_m[:, None]) * DV + offs_dv[None, :],
                         mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if LOWP:
                hh = hh.to(q.dtype)
            lse = tl.load(LSE + row0 + offs_m, mask=in_m, other=float("inf"))
            s0, s, y = _logits(q, k, offs_m, offs_n, N, M, OFFSET, WINDOW, scale, softcap,
                               Mb, smm, smn, mask_min, CAUSAL, HAS_WINDOW, SOFTCAP, MASK_KIND,
                               LOWP, PRECISION)
            p = tl.exp(s - lse[:, None])
            if LOWP:
                dv += _dot(tl.trans(p.to(q.dtype)), hh, LOWP, PRECISION)
            else:
                dv += _dot(tl.trans(p), hh, LOWP, PRECISION)
            if ATTN:
                dsum = tl.load(DS + row0 + offs_m, mask=in_m, other=0.0)
                gs = p * (_dot(hh, tl.trans(v), LOWP, PRECISION) - dsum[:, None])
                if SOFTCAP:
                    gs = gs * y / stabilize(s0 * (scale / softcap), eps)
                t = gs * s0 / (2.0 * stabilize(s0, eps))
                if LOWP:
                    t = t.to(q.dtype)
                dk += _dot(tl.trans(t), q, LOWP, PRECISION)
    if RELEVANCE:
        dv = dv * v.to(tl.float32)
    tl.store(GV + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
             dv.to(GV.dtype.element_ty), mask=vmask)
    if ATTN:
        dk = dk * scale
        if RELEVANCE:
            dk = dk * k.to(tl.float32)
        tl.store(GK + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                 dk.to(GK.dtype.element_ty), mask=kmask)


# ---- launchers -------------------------------------------------------------------------------

def _blocks(d: int, kind: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (no autotune: the
    interpreter cannot, and a fixed table keeps first calls cheap)."""
    if _backend.interpreting():
        return 16, 16, 4, 1
    if kind == "fwd":
        return (128, 64, 8, 2) if d <= 64 else (128, 32, 8, 2) if d <= 128 else (64, 32, 8, 1)
    return (64, 64, 4, 2) if d <= 64 else (64, 32, 8, 2) if d <= 128 else (32, 32, 8, 1)


def _mask_args(spec, like: torch.Tensor):
    """(tensor, kind, strides b, h, m, n, threshold) of the user mask (stride 0 on broadcast dims)."""
    m = spec.mask
    if m is None:
        return like, 0, (0, 0, 0, 0), 0.0
    strides = tuple(0 if size == 1 else st for size, st in zip(m.shape, m.stride()))
    if m.dtype == torch.bool:
        return m.view(torch.uint8), 1, strides, 0.0
    return m, 2, strides, float(torch.finfo(m.dtype).min)


def _lowp(q: torch.Tensor) -> bool:
    """bf16 dots (operands rounded to bf16, fp32 accumulation); the interpreter's bf16 dots are
    wrong, so it runs bf16 inputs through fp32 dots instead."""
    return q.dtype == torch.bfloat16 and not _backend.interpreting()


def _common(q, spec):
    lowp = _lowp(q)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    bd, bdv = max(16, triton.next_power_of_2(spec.d)), max(16, triton.next_power_of_2(spec.dv))
    flags = dict(CAUSAL=spec.causal, HAS_WINDOW=spec.window is not None,
                 SOFTCAP=spec.softcap is not None, LOWP=lowp, PRECISION=precision,
                 D=spec.d, DV=spec.dv, BD=bd, BDV=bdv)
    scalars = (spec.M - spec.N, spec.window or 0, spec.scale, spec.softcap or 1.0)
    return flags, scalars


def _launch(kernel, grid, args, flags, blocks):
    bm, bn, warps, stages = blocks
    if _backend.interpreting():
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **flags)
    else:
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **flags, num_warps=warps, num_stages=stages)


def attnlrp_forward_triton(q, k, v, spec, block_size=None):
    """``(O, lse)`` with O in q's dtype ``[B, Hq, N, dv]`` and lse fp32 ``[B, Hq, N]``."""
    o = torch.empty(spec.B, spec.Hq, spec.N, spec.dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(spec.B, spec.Hq, spec.N, dtype=torch.float32, device=q.device)
    if spec.N == 0 or spec.B * spec.Hq == 0:
        return o, lse
    flags, (offset, window, scale, softcap) = _common(q, spec)
    mask, kind, mst, mmin = _mask_args(spec, q)
    blocks = _blocks(spec.d, "fwd")
    grid = (triton.cdiv(spec.N, blocks[0]), spec.B * spec.Hq)
    args = (q, k, v, o, lse, mask, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mst,
            spec.N, spec.M, spec.Hq, spec.G, offset, window, scale, softcap, mmin)
    with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
        _launch(_fwd_kernel, grid, args, dict(flags, MASK_KIND=kind), blocks)
    return o, lse


def attnlrp_backward_triton(h, q, k, v, o, lse, spec, relevance, block_size=None):
    """``(G_Q, G_K, G_V)`` (``R_*`` in the relevance view) in the inputs' dtypes, from ``H``
    (``G_O * O / (share * stab(O))``, or ``R_O / ...``: computed by the rule)."""
    attn = spec.rule == "attnlrp"
    q, k, v = _dense(q), _dense(k), _dense(v)
    h = h.float().contiguous()  # [B, Hq, N, dv]
    dsum = (h * o.float()).sum(-1).contiguous()                           # [B, Hq, N]
    # gradients share their input's strides so one set of stride arguments serves both
    gq = torch.empty_like(q) if attn else torch.zeros_like(q)
    gk = torch.empty_like(k) if attn else torch.zeros_like(k)
    gv = torch.empty_like(v)
    if spec.N == 0 or spec.M == 0 or spec.B * spec.Hq == 0:
        return gq.zero_(), gk.zero_(), gv.zero_()
    flags, (offset, window, scale, softcap) = _common(q, spec)
    flags = dict(flags, RELEVANCE=bool(relevance))
    mask, kind, mst, mmin = _mask_args(spec, q)
    lse = lse.contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *mst)
    with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
        if attn:
            blocks = _blocks(spec.d, "bwd")
            grid = (triton.cdiv(spec.N, blocks[0]), spec.B * spec.Hq)
            args = (q, k, v, h, dsum, lse, gq, mask, *strides, spec.N, spec.M, spec.Hq, spec.G,
                    offset, window, scale, softcap, mmin, spec.epsilon)
            _launch(_dq_kernel, grid, args, dict(flags, MASK_KIND=kind), blocks)
        blocks = _blocks(spec.d, "bwd")
        grid = (triton.cdiv(spec.M, blocks[1]), spec.B * spec.Hkv)
        args = (q, k, v, h, dsum, lse, gk, gv, mask, *strides, spec.N, spec.M, spec.Hq, spec.Hkv,
                spec.G, offset, window, scale, softcap, mmin, spec.epsilon)
        _launch(_dkv_kernel, grid, args, dict(flags, MASK_KIND=kind, ATTN=attn), blocks)
    return gq, gk, gv


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if ``empty_like(t)`` has its strides (so its gradient can share them), else a copy."""
    return t if torch.empty_like(t).stride() == t.stride() else t.contiguous()


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _supports(q, k, v, spec, *rest) -> Optional[str]:
    reason = _backend.device_reason(q, k, v, spec.mask if spec.mask is not None and spec.mask.is_floating_point() else None)
    if reason:
        return reason
    if spec.mask is not None and spec.mask.device != q.device:
        return f"attention_mask on {spec.mask.device}, query on {q.device}"
    if max(spec.d, spec.dv) > MAX_HEAD_DIM:
        return f"head_dim {max(spec.d, spec.dv)} > {MAX_HEAD_DIM} is not supported by the flash kernel"
    return None


def supports_forward(q, k, v, spec, block_size=None) -> Optional[str]:
    return _supports(q, k, v, spec)


def supports_backward(h, q, k, v, o, lse, spec, relevance, block_size=None) -> Optional[str]:
    return _supports(q, k, v, spec)


dispatch.register("attnlrp_attention_forward", "triton", attnlrp_forward_triton, supports=supports_forward)
dispatch.register("attnlrp_attention_backward", "triton", attnlrp_backward_triton, supports=supports_backward)
