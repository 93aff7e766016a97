r"""AttnLRP for a whole attention block, ``O = softmax(scale * Q @ K^T + mask) @ V`` (docs/math.md,
"The attention block, fused"), without ever holding an N x M matrix in the fused paths.

Rules (``rule="attnlrp"``): uniform-epsilon on ``S0 = Q @ K^T`` and on ``P @ V``, Deep Taylor
(with bias) on the softmax, identity on a Gemma soft-cap ``tanh``. Gradient view, per head::

    H   = G_O * O / (2 stab(O))          D = rowsum(H * O)
    G_V = P^T @ H                        G_S = P * (H @ V^T - D)
    G_S <- G_S * tanh(x) / stab(x)       (soft-cap only: x = scale * S0 / softcap)
    T   = G_S * S0 / (2 stab(S0))        G_Q = scale * T @ K,  G_K = scale * T^T @ Q

``rule="cp-lrp"``: ``P`` is a constant (no relevance through the softmax path): ``G_Q = G_K = 0``
and ``V`` gets the whole epsilon rule of ``P @ V`` (``H = G_O * O / stab(O)``).
Relevance view (``relevance=True``): the backward receives ``R_O`` (``H = R_O / (2 stab(O))``)
and the results are multiplied by ``Q``, ``K``, ``V``. Grouped-query attention (``Hq`` a multiple
of ``Hkv``) sums ``G_K``, ``G_V`` over the heads of a group.

Masks (all combine; a key is attended only if every one allows it):

* ``attention_mask``: bool (``True`` = attend) or an additive float mask broadcastable to
  ``[B, Hq, N, M]`` (Hugging Face passes ``[B, 1, N, M]``); ``-inf`` *or the mask dtype's minimum*
  means masked; a ``[B, M]`` bool tensor is a key-padding mask.
* ``is_causal``: query ``i`` sits at absolute position ``i + M - N`` (bottom-right aligned, as in
  Hugging Face with a KV cache) and attends to keys ``j <= i + M - N``.
* ``sliding_window=w``: attends to keys with ``q_pos - k_pos < w`` (Hugging Face / Mistral
  convention, ``kv_idx > q_idx - sliding_window``; positions aligned as for ``is_causal``). It
  only bounds how far back a query looks: combine it with ``is_causal`` for the usual band.

Masked keys get exactly zero relevance; a fully masked query row outputs 0 and gets zero
relevance (never NaN). Hugging Face's eager attention would output the mean of ``V`` for such
(padding) rows; they carry no relevance either way.

Implementations (``impl``): ``"eager"`` is the explicit composition of the
:mod:`lrp_kernels.ops.grad` (or :mod:`lrp_kernels.ops.functional`) ops on the full N x M matrix — the
reference; ``"chunked"`` is the memory-lean PyTorch backend (any device; forward saves only
``O`` and the row log-sum-exp, backward recomputes block by block over query blocks, peak extra
memory ``O(N * block)``); ``"flash"`` the Triton kernel (:mod:`lrp_kernels.backends.triton.flash_attnlrp`);
``"auto"`` picks eager for tiny problems, else lets the dispatcher choose (Triton on CUDA,
else chunked). ``chunked`` and ``flash`` are the ``torch`` and ``triton`` backends of the kernel
ops ``attnlrp_attention_forward`` / ``attnlrp_attention_backward``.

In the relevance view, ``impl="eager"`` applies Deep Taylor to the biased logit ``S`` (the
softmax rule's ``x``), so with a *finite non-zero* additive mask it differs from the fused paths,
which use ``scale * S0``; with 0 / -inf masks (every Hugging Face mask) all agree. Likewise
with a soft-cap its relevance view passes relevance through the tanh unchanged, while the fused
paths apply the identity rule's ``x / stab(x)`` (a relative difference of about ``eps / |x|``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..backends import dispatch
from ._common import (DEFAULT_EPSILON, check_epsilon, check_float, check_same_device, compute_dtype,
                      pin_backend, record_backward, record_forward, record_module, stabilize)
from .linear_epsilon import rescale_output_gradient

RULES = ("attnlrp", "cp-lrp")
IMPLS = ("auto", "eager", "chunked", "flash")
# eager (one N x M matrix) is fastest below this many score entries per (batch, head)
_EAGER_MAX_SCORES = 128 * 128
# chunked backend: score blocks of about this many elements (at least 32 query rows): a few
# block tensors stay well below the activations a long-context model keeps anyway
_CHUNK_ELEMENTS = 1 << 20


# ---- input checks and masks ----------------------------------------------------------------

class _Spec:
    """Validated shapes and options of one call (shared by every implementation)."""

    def __init__(self, q, k, v, mask, scale, is_causal, window, softcap, epsilon, rule):
        for name, t in (("query", q), ("key", k), ("value", v)):
            check_float(name, t)
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        check_same_device(query=q, key=k, value=v, attention_mask=mask)
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        B, Hq, N, d = q.shape
        if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"key and value must agree in [batch, heads, seq], got {tuple(k.shape)} and {tuple(v.shape)}")
        Bk, Hkv, M, dk = k.shape
        if Bk != B:
            raise ValueError(f"key batch ({Bk}) must equal query batch ({B})")
        if dk != d:
            raise ValueError(f"key head_dim ({dk}) must equal query head_dim ({d})")
        if Hq % Hkv:
            raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) (GQA)")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        check_epsilon(epsilon)
        if scale is None:
            scale = d ** -0.5
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
        if window is not None and not (isinstance(window, int) and window > 0):
            raise ValueError(f"sliding_window must be a positive int or None, got {window!r}")
        self.B, self.Hq, self.Hkv, self.N, self.M, self.d, self.dv = B, Hq, Hkv, N, M, d, v.shape[3]
        self.G = Hq // Hkv
        self.scale, self.causal, self.window = float(scale), bool(is_causal), window
        self.softcap = None if softcap is None else float(softcap)
        self.epsilon, self.rule = float(epsilon), rule
        self.cd = compute_dtype(q)  # fp32 accumulation (fp64 for fp64 inputs)
        self.mask = _normalize_mask(mask, B, Hq, N, M)


def _normalize_mask(mask: Optional[torch.Tensor], B: int, H: int, N: int, M: int) -> Optional[torch.Tensor]:
    """The mask as a 4-D tensor broadcastable to [B, H, N, M] (bool or float), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
    if mask.dim() == 2:  # [B, M] key padding
        if mask.dtype != torch.bool:
            raise ValueError("a 2-D attention_mask is a [batch, keys] bool key-padding mask; "
                             f"got dtype {mask.dtype}")
        mask = mask[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D broadcastable to [B, Hq, N, M] = {[B, H, N, M]} "
                         f"(or a [B, M] bool key-padding mask), got shape {tuple(mask.shape)}")
    # Hugging Face may hand over a mask longer than the keys (static cache): use the first M
    if mask.shape[-1] > M:
        mask = mask[..., :M]
    for size, full, name in zip(mask.shape, (B, H, N, M), ("batch", "heads", "queries", "keys")):
        if size not in (1, full):
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not broadcast to "
                             f"[B, Hq, N, M] = {[B, H, N, M]} (dim {name})")
    return mask


def mask_bias(spec: _Spec, q0: int, q1: int, device: torch.device) -> Optional[torch.Tensor]:
    """Additive fp32 bias (0 / -inf / finite) for query rows ``[q0, q1)``, broadcastable to
    ``[B, Hq, q1 - q0, M]``; None when nothing is masked."""
    bias = None
    if spec.causal or spec.window is not None:
        qpos = torch.arange(q0, q1, device=device) + (spec.M - spec.N)
        diff = qpos[:, None] - torch.arange(spec.M, device=device)[None, :]
        ok = torch.ones_like(diff, dtype=torch.bool)
        if spec.causal:
            ok &= diff >= 0
        if spec.window is not None:
            ok &= diff < spec.window
        bias = torch.zeros(ok.shape, device=device, dtype=spec.cd).masked_fill_(~ok, -math.inf)
    m = spec.mask
    if m is not None:
        m = m if m.shape[-2] == 1 else m[..., q0:q1, :]
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, device=device, dtype=spec.cd).masked_fill_(~m, -math.inf)
        else:
            lo = torch.finfo(m.dtype).min
            m = m.to(spec.cd).masked_fill(m <= lo, -math.inf)
        bias = m if bias is None else bias + m
    return bias


# ---- eager: the explicit composition of the per-op rules --------------------------------------

def _constant_scale(x: torch.Tensor, c: float, relevance: bool) -> torch.Tensor:
    """``x * c``; in the relevance view a constant rescaling passes relevance unchanged."""
    if not relevance or c == 1.0:
        return x * c
    return x + (x * (c - 1.0)).detach()


def _eager(q, k, v, spec: _Spec, relevance: bool) -> torch.Tensor:
    from . import functional, grad

    ops = functional if relevance else grad
    eps = spec.epsilon
    cd = compute_dtype(q)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    if spec.G > 1:  # repeat_kv: a linear copy, needs no rule (autograd sums over the group)
        kf = kf.repeat_interleave(spec.G, dim=1)
        vf = vf.repeat_interleave(spec.G, dim=1)
    if spec.rule == "cp-lrp":
        qf, kf = qf.detach(), kf.detach()
        s = (qf @ kf.transpose(-1, -2)) * spec.scale
    else:
        s = _constant_scale(ops.matmul(qf, kf.transpose(-1, -2), epsilon=eps), spec.scale, relevance)
    if spec.softcap is not None:
        x = _constant_scale(s, 1.0 / spec.softcap, relevance)
        s = _constant_scale(ops.identity(torch.tanh, x, epsilon=eps), spec.softcap, relevance)
    bias = mask_bias(spec, 0, spec.N, q.device)
    if bias is not None:
        s = s + bias
    p = ops.softmax(s, -1) if spec.rule == "attnlrp" else torch.softmax(s, -1).detach()
    if bias is not None:  # fully masked rows: softmax is NaN there; their output is 0
        dead = torch.isneginf(s).all(-1, keepdim=True)
        p = torch.where(dead, torch.zeros((), device=p.device), p)
    o = ops.matmul(p, vf, epsilon=eps)
    return o.to(q.dtype)


# ---- chunked: the torch backend of the fused kernel ops ---------------------------------------
#
# Layout: the G query heads of a GQA group are interleaved per position ([B, Hkv, N, G, x]), so
# one query block of every head in a group is a single contiguous [B, Hkv, n*G, x] slice and
# every product is a plain 4-D matmul against its group's K / V (no copies per block).
# Per block, only the keys its masks can reach are touched (causal: up to the diagonal; sliding
# window: from the window's start), and the block tensors are updated in place (the scores
# become P, H @ V^T becomes T). K is pre-scaled, so the scores are S = scale * S0 and
# ``S0 / stab(S0) = |S| / (|S| + |scale| eps)`` exactly.

def _block_rows(spec: _Spec, block_size: Optional[int]) -> int:
    if block_size is not None:
        return int(block_size)
    per_row = max(1, spec.B * spec.Hq * spec.M)
    return int(max(1, min(spec.N, max(32, _CHUNK_ELEMENTS // per_row))))


def _rows(t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """[B, Hq, N, x] -> [B, Hkv, N, G, x], contiguous (group heads interleaved per position)."""
    return t.reshape(spec.B, spec.Hkv, spec.G, t.shape[-2], t.shape[-1]).transpose(2, 3).contiguous()


def _unrows(t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Inverse of :func:`_rows`."""
    return t.transpose(2, 3).reshape(spec.B, spec.Hq, t.shape[2], t.shape[-1])


def _key_span(spec: _Spec, q0: int, q1: int) -> tuple[int, int]:
    """Keys [lo, hi) that query rows [q0, q1) may attend to (causal / window)."""
    off = spec.M - spec.N
    lo, hi = 0, spec.M
    if spec.causal:
        hi = max(0, min(hi, q1 + off))
    if spec.window is not None:
        lo = min(hi, max(0, q0 + off - spec.window + 1))
    return lo, hi


def _mask_block(s: torch.Tensor, spec: _Spec, q0: int, q1: int, lo: int, hi: int) -> None:
    """-inf (in place) where rows [q0, q1) x keys [lo, hi) of ``s`` [B, Hkv, n, G, span] are
    masked; adds a finite additive mask."""
    off = spec.M - spec.N
    n = q1 - q0
    if spec.causal and spec.window is None and lo <= q0 + off and q1 + off == hi:
        # the keys of the last n columns are the rows' own positions: a triangle
        tri = torch.ones(n, n, dtype=torch.bool, device=s.device).triu_(1)
        s[..., hi - lo - n:].masked_fill_(tri[:, None, :], -math.inf)
    elif spec.causal or spec.window is not None:
        qpos = torch.arange(q0, q1, device=s.device)[:, None, None] + off
        kpos = torch.arange(lo, hi, device=s.device)[None, None, :]
        bad = kpos > qpos if spec.causal else None
        if spec.window is not None:
            far = kpos <= qpos - spec.window
            bad = far if bad is None else bad | far
        s.masked_fill_(bad, -math.inf)
    m = spec.mask
    if m is None:
        return
    m = (m if m.shape[-2] == 1 else m[..., q0:q1, :])[..., lo:hi]
    if m.shape[1] == 1:
        m = m[:, :, :, None, :]
    else:
        m = m.reshape(m.shape[0], spec.Hkv, spec.G, *m.shape[-2:]).transpose(2, 3)
    if m.dtype == torch.bool:
        s.masked_fill_(~m, -math.inf)
    else:
        s.add_(m.to(s.dtype).masked_fill(m <= torch.finfo(m.dtype).min, -math.inf))


def _softcap(s: torch.Tensor, spec: _Spec):
    """``softcap * tanh(x)`` with ``x = s / softcap``, and ``tanh(x) / stab(x)`` (identity rule)."""
    x = s / spec.softcap
    y = torch.tanh(x)
    return y * spec.softcap, y.div_(stabilize(x, spec.epsilon))


def attnlrp_forward_torch(q, k, v, spec: _Spec, block_size: Optional[int]):
    """``(O, lse)``: O in q's dtype [B, Hq, N, dv], lse [B, Hq, N] (+inf on fully masked rows)."""
    bq = _block_rows(spec, block_size)
    B, Hkv, G = spec.B, spec.Hkv, spec.G
    ks, vf = k.to(spec.cd) * spec.scale, v.to(spec.cd)
    qr = _rows(q.to(spec.cd), spec)
    o = torch.zeros(B, spec.Hq, spec.N, spec.dv, dtype=q.dtype, device=q.device)
    og = o.view(B, Hkv, G, spec.N, spec.dv)
    lse = torch.full((B, Hkv, spec.N, G, 1), math.inf, dtype=spec.cd, device=q.device)
    buf = torch.empty(B * Hkv * min(bq, spec.N) * G * spec.M, dtype=spec.cd, device=q.device)
    for q0 in range(0, spec.N, bq):
        q1 = min(spec.N, q0 + bq)
        lo, hi = _key_span(spec, q0, q1)
        if hi <= lo:
            continue  # every row fully masked: O = 0, lse = +inf
        n, span = q1 - q0, hi - lo
        s = buf[:B * Hkv * n * G * span].view(B * Hkv, n * G, span)
        torch.bmm(qr[:, :, q0:q1].reshape(B * Hkv, n * G, spec.d),
                  ks[:, :, lo:hi].reshape(B * Hkv, span, spec.d).transpose(1, 2), out=s)
        s = s.view(B, Hkv, n * G, span)
        if spec.softcap is not None:
            s = _softcap(s, spec)[0]
        _mask_block(s.view(B, Hkv, n, G, span), spec, q0, q1, lo, hi)
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill_(torch.isneginf(m), 0.0)
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        alive = l > 0
        l_safe = torch.where(alive, l, torch.ones((), dtype=l.dtype, device=l.device))
        og[:, :, :, q0:q1] = ((p @ vf[:, :, lo:hi]) / l_safe).view(B, Hkv, n, G, spec.dv).transpose(2, 3)
        lse[:, :, q0:q1] = torch.where(alive, m + torch.log(l_safe), math.inf).view(B, Hkv, n, G, 1)
    return o, _unrows(lse, spec)[..., 0]


def relevance_input(grad_o, o, spec: _Spec, relevance: bool) -> torch.Tensor:
    """``H``: ``G_O * O / (share * stab(O))``, or ``R_O / (share * stab(O))`` (fp32 or fp64)."""
    share = 2.0 if spec.rule == "attnlrp" else 1.0
    of = o.to(spec.cd)
    h = grad_o.to(spec.cd) / (share * stabilize(of, spec.epsilon))
    return h if relevance else h * of


def attnlrp_backward_torch(h, q, k, v, o, lse, spec: _Spec, relevance: bool,
                           block_size: Optional[int]):
    """``(G_Q, G_K, G_V)`` (relevance view: ``R_Q, R_K, R_V``) block by block over queries,
    from ``H`` (:func:`relevance_input`, computed by the rule for every backend).

    Three block buffers are allocated once and reused (S then P, S0/stab(S0), H V^T then T);
    the gradients accumulate in place (``baddbmm_``), so the loop allocates nothing large."""
    bq = _block_rows(spec, block_size)
    attn = spec.rule == "attnlrp"
    B, Hkv, G, d, dv, M = spec.B, spec.Hkv, spec.G, spec.d, spec.dv, spec.M
    BH = B * Hkv
    hr = _rows(h, spec)
    dr = _rows((h * o.to(spec.cd)).sum(-1, keepdim=True), spec)  # D = rowsum(H * O)
    lr = _rows(lse.to(spec.cd)[..., None], spec)
    del h
    qr = _rows(q.to(spec.cd), spec)
    ks, vf = k.to(spec.cd) * spec.scale, v.to(spec.cd)
    gv = torch.zeros(B, Hkv, M, dv, dtype=spec.cd, device=q.device)
    gk = torch.zeros(B, Hkv, M, d, dtype=spec.cd, device=q.device) if attn else None
    gq = torch.zeros(B, spec.Hq, spec.N, d, dtype=spec.cd, device=q.device) if attn else None
    gqg = gq.view(B, Hkv, G, spec.N, d) if attn else None
    size = BH * min(bq, spec.N) * G * M
    bufs = [torch.empty(size, dtype=spec.cd, device=q.device) for _ in range(3 if attn else 1)]
    eps_s = abs(spec.scale) * spec.epsilon  # stab of S0, seen on the scaled scores
    for q0 in range(0, spec.N, bq):
        q1 = min(spec.N, q0 + bq)
        lo, hi = _key_span(spec, q0, q1)
        if hi <= lo:
            continue
        n, span = q1 - q0, hi - lo
        s, r, t = [buf[:BH * n * G * span].view(BH, n * G, span) for buf in bufs] + [None] * (3 - len(bufs))
        qb = qr[:, :, q0:q1].reshape(BH, n * G, d)
        hb = hr[:, :, q0:q1].reshape(BH, n * G, dv)
        kb, vb = ks[:, :, lo:hi].reshape(BH, span, d), vf[:, :, lo:hi].reshape(BH, span, dv)
        torch.bmm(qb, kb.transpose(1, 2), out=s)
        if attn:  # S0 / stab(S0) = |S| / (|S| + |scale| eps), before masking turns S into -inf
            torch.abs(s, out=r)
            r.div_(torch.add(r, eps_s, out=t))
        cap = None
        if spec.softcap is not None:
            s, cap = _softcap(s, spec)
        _mask_block(s.view(B, Hkv, n, G, span), spec, q0, q1, lo, hi)
        p = s.sub_(lr[:, :, q0:q1].reshape(BH, n * G, 1)).exp_()      # P: 0 where masked / dead rows
        gv.view(BH, M, dv)[:, lo:hi].baddbmm_(p.transpose(1, 2), hb)  # G_V += P^T @ H (group sum)
        if not attn:
            continue
        torch.bmm(hb, vb.transpose(1, 2), out=t)
        t.sub_(dr[:, :, q0:q1].reshape(BH, n * G, 1)).mul_(p)         # G_S = P * (H V^T - D)
        if cap is not None:
            t.mul_(cap)                                               # identity rule on tanh
        t.mul_(r)                                                     # 2 T = G_S * S0 / stab(S0)
        gqg[:, :, :, q0:q1] = torch.bmm(t, kb).view(B, Hkv, n, G, d).transpose(2, 3)  # 2 G_Q (K pre-scaled)
        gk.view(BH, M, d)[:, lo:hi].baddbmm_(t.transpose(1, 2), qb)   # 2 G_K / scale
    del bufs
    if attn:
        gq = gq.mul_(0.5)
        gk = gk.mul_(0.5 * spec.scale)
    if relevance:
        gv = gv * v.to(spec.cd)
        if attn:
            gq, gk = gq * q.to(spec.cd), gk * k.to(spec.cd)
    if not attn:
        gq, gk = torch.zeros_like(q), torch.zeros_like(k)
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


dispatch.register("attnlrp_attention_forward", "torch", attnlrp_forward_torch)
dispatch.register("attnlrp_attention_backward", "torch", attnlrp_backward_torch)


class AttnLRPFn(torch.autograd.Function):
    """Fused AttnLRP attention: saves Q, K, V, O and the row log-sum-exp only."""

    @staticmethod
    def forward(ctx, q, k, v, spec, relevance, backend, block_size):
        o, lse = dispatch.call("attnlrp_attention_forward", q, k, v, spec, block_size, backend=backend)
        ctx.spec, ctx.relevance, ctx.backend, ctx.block_size = spec, relevance, backend, block_size
        ctx.save_for_backward(q, k, v, o, lse)
        record_forward(ctx, f"attention({spec.rule})", (q, k, v), o)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse = ctx.saved_tensors
        h = relevance_input(grad_o, o, ctx.spec, ctx.relevance)
        gq, gk, gv = dispatch.call("attnlrp_attention_backward", h, q, k, v, o, lse, ctx.spec,
                                   ctx.relevance, ctx.block_size, backend=ctx.backend)
        # CP-LRP: the epsilon rule of P @ V alone (conserving); AttnLRP: the softmax absorbs
        record_backward(ctx, (gq, gk, gv), grad_o, ctx.relevance, ctx.spec.rule == "cp-lrp")
        need = ctx.needs_input_grad
        return (gq if need[0] else None, gk if need[1] else None, gv if need[2] else None,
                None, None, None, None)


def _load_triton() -> None:
    """Make sure the triton backend registered its kernels (the dispatcher loads it lazily)."""
    dispatch.backend_status("triton")


def attnlrp_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    epsilon: float = DEFAULT_EPSILON,
    rule: str = "attnlrp",
    relevance: bool = False,
    impl: str = "auto",
    block_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``softmax(scale * Q @ K^T + mask) @ V`` with the AttnLRP (or CP-LRP) backward.

    Args:
        query: ``[B, Hq, N, d]``; key, value: ``[B, Hkv, M, d]`` / ``[B, Hkv, M, dv]``, ``Hq % Hkv == 0``.
        attention_mask: None, bool (True = attend), or additive float (-inf / dtype min = masked),
            broadcastable to ``[B, Hq, N, M]``; or a ``[B, M]`` bool key-padding mask.
        scale: default ``d ** -0.5``.
        is_causal: causal, bottom-right aligned (query i at position ``i + M - N``).
        sliding_window: attend to keys with ``q_pos - k_pos < sliding_window``.
        softcap: Gemma-style ``S = softcap * tanh(S / softcap)`` (identity rule on tanh).
        epsilon: the stabiliser of both products (and of the tanh's identity rule).
        rule: ``"attnlrp"`` or ``"cp-lrp"`` (no relevance through the softmax path).
        relevance: False = gradient view (what model patches use), True = relevance view.
        impl: ``"auto"``, ``"eager"``, ``"chunked"`` (PyTorch, memory-lean) or ``"flash"`` (Triton).
            ``chunked`` / ``flash`` force the ``torch`` / ``triton`` backend of the fused kernel ops.
        block_size: query rows per block for ``chunked`` (default: about 1M scores, >= 32 rows).
        backend: with ``impl="auto"``, the backend to use (as for every rule; ``None`` lets the
            dispatcher choose: flash where Triton runs on the device, else chunked, or eager
            for tiny problems).

    Returns:
        ``O`` ``[B, Hq, N, dv]`` in the inputs' dtype (fp32 accumulation).
    """
    spec = _Spec(query, key, value, attention_mask, scale, is_causal, sliding_window, softcap, epsilon, rule)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if block_size is not None and not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if impl == "eager":
        return _eager(query, key, value, spec, relevance)
    if impl != "auto":
        backend = {"chunked": "torch", "flash": "triton"}[impl]
    backend = pin_backend(backend)
    if backend != "torch":
        _load_triton()
    if (impl == "auto" and spec.N * spec.M <= _EAGER_MAX_SCORES and dispatch.chosen_backend(
            "attnlrp_attention_forward", query, key, value, spec, block_size, backend=backend) == "torch"):
        return _eager(query, key, value, spec, relevance)  # one small matrix beats the blocks
    return AttnLRPFn.apply(query, key, value, spec, relevance, backend, block_size)


# ---- the platform path: the platform's own attention forward and backward, rescaled ----------

class _GradScaleFn(torch.autograd.Function):
    """Forward: ``x`` unchanged. Backward: the gradient times a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def attnlrp_platform(attention_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     epsilon: float = DEFAULT_EPSILON, rule: str = "attnlrp",
                     backend: Optional[str] = None) -> torch.Tensor:
    """``attention_fn(query, key, value)`` (any softmax attention with a plain autograd backward:
    ``F.scaled_dot_product_attention`` / FlashAttention / cuDNN / eager) with the AttnLRP or CP-LRP
    rule in the gradient view, at the price of the platform kernel's own forward and backward.

    The exact rule (module docstring) is the standard attention backward fed
    ``H = G_O * O / (share * stab(O))``, except that AttnLRP scales ``G_Q`` and ``G_K`` by
    ``|S0| / (2 (|S0| + eps))`` per score where the standard backward gives ``1``: here they
    are halved, i.e. the factor ``|S0| / (|S0| + eps)`` is taken as 1. ``G_V`` is exact.
    The relative deviation per score is ``eps / (|S0| + eps)``: below 1e-4 for scores
    ``|S0| >= 0.01`` at ``eps = 1e-6`` (trained models), larger for the tiny scores of randomly
    initialised ones; ``impl="chunked"`` / ``"flash"`` (:func:`attnlrp_attention`) is exact.
    CP-LRP (``P`` constant) is exact here: ``G_Q = G_K = 0``, ``H = G_O * O / stab(O)``.
    Not for a soft-capped softmax (its identity rule on ``tanh`` is not the plain backward).
    The forward values are ``attention_fn``'s own, bit for bit.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    check_epsilon(epsilon)
    backend = pin_backend(backend)
    attn = rule == "attnlrp"

    def attention(q, k, v):
        if attn:
            q, k = _GradScaleFn.apply(q, 0.5), _GradScaleFn.apply(k, 0.5)
        else:
            q, k = q.detach(), k.detach()
        return attention_fn(q, k, v)

    return record_module(f"attention({rule}, platform)", attention, (query, key, value), expected=not attn,
                         then=lambda o: rescale_output_gradient(o, epsilon, backend=backend,
                                                                share=2.0 if attn else 1.0))
