"""The float64 oracle of ``torch.nn.MultiheadAttention``'s rules: the projections' epsilon rule
and the attention block of :mod:`helpers.oracle`, composed by hand (never by calling lrp_kernels)."""
from __future__ import annotations

import torch

from . import oracle as O

EPS = 1e-6


def _allowed_and_bias(m, call, B, L, S):
    """[B, H, L, S'] allowed (bool) and finite bias (0 at masked keys) of the module's masks,
    S' with the keys bias_k / zero attention append."""
    H = m.num_heads
    allowed = torch.ones(B, H, L, S, dtype=torch.bool)
    bias = torch.zeros(B, H, L, S, dtype=torch.float64)
    am = call.get("attn_mask")
    if am is not None:
        am = am.view(B, H, L, S) if am.dim() == 3 else am.expand(B, H, L, S)
        if am.dtype == torch.bool:
            allowed &= ~am
        else:
            allowed &= ~torch.isneginf(am)
            bias += torch.where(torch.isneginf(am), 0.0, am.double())
    kpm = call.get("key_padding_mask")
    if kpm is not None:
        kpm = kpm[:, None, None, :].expand(B, H, L, S)
        if kpm.dtype == torch.bool:
            allowed &= ~kpm
        else:
            allowed &= ~torch.isneginf(kpm)
            bias += torch.where(torch.isneginf(kpm), 0.0, kpm.double())
    extra = int(m.bias_k is not None) + int(m.add_zero_attn)
    if extra:
        allowed = torch.cat([allowed, torch.ones(B, H, L, extra, dtype=torch.bool)], -1)
        bias = torch.cat([bias, torch.zeros(B, H, L, extra, dtype=torch.float64)], -1)
    return allowed, bias


def _attention_G_constant_query(Q, K, V, G_O, scale, eps, allowed, bias, cp):
    """attention_G with a constant Q: the uniform rule of Q @ K^T gives K all of the score
    relevance (share 1)."""
    Q, Kr, Vr, S0, x, S, P, Oh, G = O._attention_forward(Q, K, V, scale, allowed, bias, None)
    if cp:
        _, GVr = O.matmul_G(P, Vr, G_O, EPS, share=1.0)
        return Oh, torch.zeros_like(Q), torch.zeros_like(K.double()), GVr
    GP, GVr = O.matmul_G(P, Vr, G_O, eps)
    GS = O.softmax_G(S, GP, dim=-1)
    _, GKt = O.matmul_G(Q, Kr.transpose(-1, -2), scale * GS, eps, share=1.0)
    return Oh, torch.zeros_like(Q), GKt.transpose(-1, -2), GVr


def oracle_mha(m, q, k, v, call, seed, view: str, cp: bool = False, constant_query: bool = False):
    """``(output, seed, (query, key, value) relevance or modified gradient)``, batch-first
    float64, of ``nn.MultiheadAttention`` ``m`` from the oracle's epsilon rule (projections) and
    attention block. ``call``: the module call's masks; ``seed``: the output seed (a tensor, or an
    int drawing a random one); ``view``: "G" (gradient) or "R" (relevance); ``cp``: CP-LRP;
    ``constant_query``: the query is a constant (gradient view only)."""
    bf = m.batch_first
    q, k, v = ((t if bf else t.transpose(0, 1)).double() for t in (q, k, v))
    E, H = m.embed_dim, m.num_heads
    B, L, _ = q.shape
    S, d = k.shape[1], E // m.num_heads
    if m._qkv_same_embed_dim:
        Wq, Wk, Wv = m.in_proj_weight.detach().double().split(E)
    else:
        Wq, Wk, Wv = (w.detach().double() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.detach().double().split(E)
    Wo = m.out_proj.weight.detach().double()
    bo = None if m.out_proj.bias is None else m.out_proj.bias.detach().double()
    qp, kp, vp = O.linear_z(q, Wq, bq), O.linear_z(k, Wk, bk), O.linear_z(v, Wv, bv)
    if m.bias_k is not None:
        kp = torch.cat([kp, m.bias_k.detach().double().expand(B, 1, E)], 1)
        vp = torch.cat([vp, m.bias_v.detach().double().expand(B, 1, E)], 1)
    if m.add_zero_attn:
        kp = torch.cat([kp, torch.zeros(B, 1, E, dtype=torch.float64)], 1)
        vp = torch.cat([vp, torch.zeros(B, 1, E, dtype=torch.float64)], 1)
    allowed, bias = _allowed_and_bias(m, call, B, L, S)

    def heads(t):
        return t.reshape(B, t.shape[1], H, d).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(B, t.shape[2], E)

    Q, K, V = heads(qp), heads(kp), heads(vp)
    scale = d ** -0.5
    Oh = O.attention_G(Q, K, V, torch.zeros(B, H, L, d, dtype=torch.float64), scale, EPS, allowed, bias, cp=cp)[0]
    o = merge(Oh)
    out = O.linear_z(o, Wo, bo)
    if isinstance(seed, torch.Tensor):
        seed_out = seed.double()
    else:
        seed_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if view == "G":
        Go = O.linear_epsilon_G(o, Wo, bo, seed_out, EPS)
        attention = _attention_G_constant_query if constant_query else O.attention_G
        _, GQ, GK, GV = attention(Q, K, V, heads(Go), scale, EPS, allowed, bias, cp=cp)
        proj = O.linear_epsilon_G
    else:
        Ro = O.linear_epsilon_R(o, Wo, bo, seed_out, EPS)
        if bias.any():  # the contract: relevance passes the additive mask unchanged (= gradient view x input)
            _, GQ, GK, GV = O.attention_G(Q, K, V, heads(Ro) / Oh, scale, EPS, allowed, bias, cp=cp)
            GQ, GK, GV = GQ * Q, GK * K, GV * V
        else:
            _, GQ, GK, GV = O.attention_R(Q, K, V, heads(Ro), scale, EPS, allowed, cp=cp)
        proj = O.linear_epsilon_R
    Gq, Gk, Gv = merge(GQ), merge(GK)[:, :S], merge(GV)[:, :S]
    rq, rk, rv = proj(q, Wq, bq, Gq, EPS), proj(k, Wk, bk, Gk, EPS), proj(v, Wv, bv, Gv, EPS)
    return out, seed_out, (rq, rk, rv)
