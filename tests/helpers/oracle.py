"""Independent float64 oracle of SPEC.md, written from the formulas (einsum / explicit
Jacobians), never by calling lrp_kernels. Every function takes and returns float64 tensors
(inputs are converted); ``R_*`` are relevances (relevance view), ``G_*`` modified gradients
(gradient view).
"""
from __future__ import annotations

import torch

f64 = torch.float64


def d(t):
    return None if t is None else t.detach().to(f64)


def stab(z, eps):
    z = d(z)
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


# ---- epsilon linear: z = x W^T + b ----------------------------------------------------------

def linear_z(x, W, b=None):
    z = torch.einsum("...k,nk->...n", d(x), d(W))
    return z if b is None else z + d(b)


def linear_epsilon_R(x, W, b, R_z, eps):
    """R_x[..., k] = sum_n x_k W_nk R_z_n / stab(z_n)."""
    z = linear_z(x, W, b)
    return torch.einsum("...k,nk,...n->...k", d(x), d(W), d(R_z) / stab(z, eps))


def linear_epsilon_G(x, W, b, G_z, eps):
    z = linear_z(x, W, b)
    return torch.einsum("nk,...n->...k", d(W), d(G_z) * z / stab(z, eps))


# ---- epsilon add (n inputs, broadcasting) -----------------------------------------------------

def add_R(inputs, R_z, eps):
    z = sum(d(t) for t in inputs)
    return [(d(t) * d(R_z) / stab(z, eps)).sum_to_size(t.shape) for t in inputs]


def add_G(inputs, G_z, eps):
    z = sum(d(t) for t in inputs)
    return [(d(G_z) * z / stab(z, eps)).sum_to_size(t.shape) for t in inputs]


# ---- uniform product --------------------------------------------------------------------------

def mul_R(a, b, R_z, a_const=False, b_const=False):
    share = 1.0 if (a_const or b_const) else 0.5
    Ra = None if a_const else (share * d(R_z)).sum_to_size(a.shape)
    Rb = None if b_const else (share * d(R_z)).sum_to_size(b.shape)
    return Ra, Rb


def mul_G(a, b, G_z, a_const=False, b_const=False):
    share = 1.0 if (a_const or b_const) else 0.5
    Ga = None if a_const else (share * d(G_z) * d(b)).sum_to_size(a.shape)
    Gb = None if b_const else (share * d(G_z) * d(a)).sum_to_size(b.shape)
    return Ga, Gb


# ---- uniform-epsilon matmul (batched, broadcasting, >= 2-D) -----------------------------------

def matmul_R(A, B, R_O, eps, share=2.0):
    A, B = d(A), d(B)
    O = A @ B
    N = d(R_O) / (share * stab(O, eps))
    Ab, Bb = _bcast(A, B)
    RA = torch.einsum("...ik,...kj,...ij->...ik", Ab, Bb, N).sum_to_size(A.shape)
    RB = torch.einsum("...ik,...kj,...ij->...kj", Ab, Bb, N).sum_to_size(B.shape)
    return RA, RB


def matmul_G(A, B, G_O, eps, share=2.0):
    A, B = d(A), d(B)
    O = A @ B
    H = d(G_O) * O / (share * stab(O, eps))
    Ab, Bb = _bcast(A, B)
    GA = torch.einsum("...kj,...ij->...ik", Bb, H).sum_to_size(A.shape)
    GB = torch.einsum("...ik,...ij->...kj", Ab, H).sum_to_size(B.shape)
    return GA, GB


def _bcast(A, B):
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    return A.expand(*batch, *A.shape[-2:]), B.expand(*batch, *B.shape[-2:])


# ---- Deep-Taylor softmax (explicit Jacobian, row by row) ---------------------------------------

def _rows(x, dim):
    x = d(x).movedim(dim, -1)
    return x, x.reshape(-1, x.shape[-1])


def _softmax_jacobian(u):
    """J[j, i] = ds_j/du_i of s = softmax(u) (1-D u)."""
    return torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), u)


def _per_unmasked_row(x, t, dim, T, rule):
    """Row by row along ``dim``: ``rule(u, t_row)`` on the row's unmasked entries (u = x / T;
    masked: -inf or the dtype's min), 0 on the masked ones and on fully masked rows."""
    xm, xr = _rows(x, dim)
    _, tr = _rows(t, dim)
    out = torch.zeros_like(xr)
    for r in range(xr.shape[0]):
        keep = ~(torch.isneginf(xr[r]) | (xr[r] <= torch.finfo(x.dtype).min))
        if keep.any():
            out[r][keep] = rule(xr[r][keep] / T, tr[r][keep])
    return out.reshape(xm.shape).movedim(-1, dim)


def softmax_R(x, R_s, dim=-1, T=1.0):
    """R_x_i = sum_j u_i * dS_j/du_i * R_s_j / s_j with u = x / T, on unmasked entries only."""
    def rule(u, R):
        return u * (_softmax_jacobian(u).T @ (R / torch.softmax(u, 0)))
    return _per_unmasked_row(x, R_s, dim, T, rule)


def softmax_G(x, G_s, dim=-1, T=1.0):
    """Plain softmax gradient w.r.t. x (u = x / T), masked entries 0."""
    def rule(u, G):
        return (_softmax_jacobian(u).T @ G) / T
    return _per_unmasked_row(x, G_s, dim, T, rule)


# ---- norms -------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    x = d(x)
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * d(w)


def rms_norm_G(x, w, G_y, eps):
    x = d(x)
    rstd = 1.0 / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    g = d(G_y) * rstd
    return g if w is None else g * d(w)


def layer_norm(x, w, b, eps):
    x = d(x)
    c = x - x.mean(-1, keepdim=True)
    y = c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * d(w)
    return y if b is None else y + d(b)


def layer_norm_R(x, w, b, R_y, eps, epsilon):
    """Epsilon rule on the centring (explicit matrix C = I - 1/n), identity on scaling, epsilon on +b."""
    x = d(x)
    n = x.shape[-1]
    C = torch.eye(n, dtype=f64) - 1.0 / n  # c = x @ C^T (C symmetric)
    c = x @ C
    std = torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    u = c / std * (d(w) if w is not None else 1.0)
    y = u + (d(b) if b is not None else 0.0)
    R_c = u * d(R_y) / stab(y, epsilon)
    return torch.einsum("...j,ij,...i->...j", x, C, R_c / stab(c, epsilon))


def layer_norm_G(x, w, G_y, eps):
    x = d(x)
    c = x - x.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    u = d(G_y) * rstd * (d(w) if w is not None else 1.0)
    n = x.shape[-1]
    C = torch.eye(n, dtype=f64) - 1.0 / n
    return u @ C


# ---- epsilon mean, identity --------------------------------------------------------------------

def mean_R(x, dim, R_z, eps, keepdim=False):
    x = d(x)
    z = x.mean(dim, keepdim=True)
    R = d(R_z) if keepdim else d(R_z).unsqueeze(dim)
    return x * (R / stab(z, eps)) / x.shape[dim]


def mean_G(x, dim, G_z, eps, keepdim=False):
    x = d(x)
    z = x.mean(dim, keepdim=True)
    G = d(G_z) if keepdim else d(G_z).unsqueeze(dim)
    return (G * z / stab(z, eps) / x.shape[dim]).expand_as(x)


def identity_G(fn, x, G_y, eps):
    x = d(x)
    return d(G_y) * fn(x) / stab(x, eps)


# ---- additions (appended): multi-dim mean, torch.matmul 1-D promotion, normalize ------------

def _mean_dims(x, dims):
    dims = tuple(range(x.dim())) if dims is None else tuple(k % x.dim() for k in dims)
    n = 1
    for k in dims:
        n *= x.shape[k]
    return dims, n


def _unsqueeze_dims(t, dims):
    for k in sorted(dims):
        t = t.unsqueeze(k)
    return t


def mean_dims_R(x, dims, R_z, eps, keepdim=False):
    """R_x = x * R_z / (n stab(z)) broadcast over the reduced dims (dims=None: all)."""
    x = d(x)
    dims, n = _mean_dims(x, dims)
    z = x.sum(dims, keepdim=True) / n
    R = d(R_z) if keepdim else _unsqueeze_dims(d(R_z), dims)
    return x * (R.reshape(z.shape) / stab(z, eps)) / n


def mean_dims_G(x, dims, G_z, eps, keepdim=False):
    x = d(x)
    dims, n = _mean_dims(x, dims)
    z = x.sum(dims, keepdim=True) / n
    G = d(G_z) if keepdim else _unsqueeze_dims(d(G_z), dims)
    return (G.reshape(z.shape) * z / stab(z, eps) / n).expand_as(x)


def _promote(A, B, G_O):
    """torch.matmul's 1-D rules: a 1-D A is a row, a 1-D B a column (removed from O again)."""
    A, B, G = d(A), d(B), d(G_O)
    if A.dim() == 1:
        A, G = A.unsqueeze(0), G.unsqueeze(-1 if B.dim() == 1 else -2)
    if B.dim() == 1:
        B, G = B.unsqueeze(-1), G.unsqueeze(-1)
    return A, B, G


def matmul_any_R(A, B, R_O, eps, share=2.0):
    A2, B2, R2 = _promote(A, B, R_O)
    RA, RB = matmul_R(A2, B2, R2, eps, share)
    return RA.reshape(A.shape), RB.reshape(B.shape)


def matmul_any_G(A, B, G_O, eps, share=2.0):
    A2, B2, G2 = _promote(A, B, G_O)
    GA, GB = matmul_G(A2, B2, G2, eps, share)
    return GA.reshape(A.shape), GB.reshape(B.shape)


def normalize_G(x, G_y, p, dim, eps):
    """Identity rule with the norm a constant: G_x = G_y / max(||x||_p, eps)."""
    x = d(x)
    return d(G_y) / x.norm(p=p, dim=dim, keepdim=True).clamp_min(eps)


# ---- rules for any function (SPEC last rows), from explicit float64 Jacobians ------------------

def _jacobians(fn, inputs):
    """J[k][i] as a (y_k.numel, x_i.numel) matrix, outputs y = fn(*inputs) (tuple), all float64."""
    xs = tuple(d(x) for x in inputs)
    ys = fn(*xs)
    ys = ys if isinstance(ys, tuple) else (ys,)

    def as_tuple(*a):
        y = fn(*a)
        return y if isinstance(y, tuple) else (y,)

    J = torch.autograd.functional.jacobian(as_tuple, xs)
    return xs, ys, [[J[k][i].reshape(ys[k].numel(), xs[i].numel()) for i in range(len(xs))]
                    for k in range(len(ys))]


def generic_epsilon_R(fn, inputs, R_outs, eps, receive=None, share=False):
    """R_i = x_i * sum_k J_ki^T (R_k / (n stab(y_k))); only inputs with receive[i] get relevance
    (others None); n = number of receivers if share (uniform-epsilon) else 1."""
    xs, ys, J = _jacobians(fn, inputs)
    receive = receive or [True] * len(xs)
    n = sum(receive) if share else 1
    out = []
    for i, x in enumerate(xs):
        if not receive[i]:
            out.append(None)
            continue
        acc = torch.zeros(x.numel(), dtype=f64)
        for k, y in enumerate(ys):
            acc += J[k][i].T @ (d(R_outs[k]).reshape(-1) / (n * stab(y, eps).reshape(-1)))
        out.append(x * acc.reshape(x.shape))
    return out


def generic_taylor_R(fn, inputs, R_outs, eps, bias=True, reference=None):
    """R_i = (x_i - r_i) * sum_k J_ki(x)^T (R_k / D_k), D_k = stab(y_k) with bias, else
    stab(sum_i J_ki(x) (x_i - r_i)); r = 0 when reference is None."""
    xs, ys, J = _jacobians(fn, inputs)
    refs = [torch.zeros_like(x) for x in xs] if reference is None else [d(r).expand_as(x) for r, x in zip(reference, xs)]
    deltas = [(x - r).reshape(-1) for x, r in zip(xs, refs)]
    denoms = []
    for k, y in enumerate(ys):
        lin = sum(J[k][i] @ deltas[i] for i in range(len(xs)))
        denoms.append(stab(y.reshape(-1) if bias else lin, eps))
    out = []
    for i, x in enumerate(xs):
        acc = sum(J[k][i].T @ (d(R_outs[k]).reshape(-1) / denoms[k]) for k in range(len(ys)))
        out.append((deltas[i] * acc).reshape(x.shape))
    return out


# ---- attention block: the unfused rules composed (uniform-epsilon, Deep Taylor, identity) -------

def attention_allowed(B, H, N, M, causal=False, window=None, key_keep=None):
    """[B, H, N, M] bool: query i sits at absolute position i + M - N (bottom-right aligned);
    causal: k_pos <= q_pos; window w: q_pos - k_pos < w; key_keep [B, M] bool: padding."""
    qpos = torch.arange(N)[:, None] + (M - N)
    kpos = torch.arange(M)[None, :]
    ok = torch.ones(N, M, dtype=torch.bool)
    if causal:
        ok &= kpos <= qpos
    if window is not None:
        ok &= (qpos - kpos) < window
    ok = ok.expand(B, H, N, M).clone()
    if key_keep is not None:
        ok &= key_keep[:, None, None, :].bool()
    return ok


def _attention_forward(Q, K, V, scale, allowed, bias, softcap):
    Q, K, V = d(Q), d(K), d(V)
    G = Q.shape[1] // K.shape[1]
    Kr, Vr = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)  # head h uses kv head h // G
    S0 = torch.einsum("bhnd,bhmd->bhnm", Q, Kr)
    x = scale * S0 if softcap is None else scale * S0 / softcap
    Sc = x if softcap is None else softcap * torch.tanh(x)
    S = Sc if bias is None else Sc + d(bias)
    if allowed is not None:
        S = torch.where(allowed, S, torch.full_like(S, float("-inf")))
    rowmax = S.amax(-1, keepdim=True)
    dead = torch.isneginf(rowmax)
    E = torch.exp(S - torch.where(dead, torch.zeros_like(rowmax), rowmax))
    den = E.sum(-1, keepdim=True)
    P = torch.where(dead, torch.zeros_like(E), E / torch.where(dead, torch.ones_like(den), den))
    O = P @ Vr
    return Q, Kr, Vr, S0, x, S, P, O, G


def _group_sum(T, G):
    B, Hq, M, D = T.shape
    return T.reshape(B, Hq // G, G, M, D).sum(2)


def attention_G(Q, K, V, G_O, scale, eps, allowed=None, bias=None, softcap=None, cp=False):
    """Gradient view of the attention block built from the per-op rules of SPEC:
    O = P @ V (uniform-epsilon), P = softmax(S) (plain gradient), S = softcap*tanh(x)
    (identity), S0 = Q @ K^T (uniform-epsilon), scale and mask constants. Returns O, G_Q, G_K, G_V.
    cp: P constant (CP-LRP): G_Q = G_K = 0, V gets the whole epsilon rule."""
    Q, Kr, Vr, S0, x, S, P, O, G = _attention_forward(Q, K, V, scale, allowed, bias, softcap)
    if cp:
        _, GVr = matmul_G(P, Vr, G_O, eps, share=1.0)
        return O, torch.zeros_like(Q), torch.zeros_like(d(K)), _group_sum(GVr, G)
    GP, GVr = matmul_G(P, Vr, G_O, eps)
    GS = softmax_G(S, GP, dim=-1)
    if softcap is not None:
        GS = identity_G(torch.tanh, x, softcap * GS, eps) / softcap
    GQ, GKt = matmul_G(Q, Kr.transpose(-1, -2), scale * GS, eps)
    return O, GQ, _group_sum(GKt.transpose(-1, -2), G), _group_sum(GVr, G)


def attention_R(Q, K, V, R_O, scale, eps, allowed=None, cp=False):
    """Relevance view from the per-op relevance rules (0 / -inf masks, no soft-cap):
    R_P, R_V from P @ V; R_S = Deep Taylor; R_S0 = R_S (constant scale); R_Q, R_K from Q @ K^T."""
    Q, Kr, Vr, S0, x, S, P, O, G = _attention_forward(Q, K, V, scale, allowed, None, None)
    if cp:
        _, RVr = matmul_R(P, Vr, R_O, eps, share=1.0)
        return O, torch.zeros_like(Q), torch.zeros_like(d(K)), _group_sum(RVr, G)
    RP, RVr = matmul_R(P, Vr, R_O, eps)
    RS = softmax_R(S, RP, dim=-1)
    RQ, RKt = matmul_R(Q, Kr.transpose(-1, -2), RS, eps)
    return O, RQ, _group_sum(RKt.transpose(-1, -2), G), _group_sum(RVr, G)


# ---- gamma rule for a linear layer (explicit per-output contributions) -----------------------------

def _gamma_parts(x, W, b, gamma, z=None):
    """Z[..., n, k] = W_nk x_k; the sign of the layer's output z (given, else sum_k Z + b) picks
    which contributions gamma enlarges: Z + gamma Z^+ (and b + gamma b^+) for z >= 0, else the
    negatives. ``b`` is the rule's bias (None when the rule zeroes it; then pass the layer's z)."""
    x, W = d(x), d(W)
    Z = torch.einsum("...k,nk->...nk", x, W)
    b = torch.zeros(W.shape[0], dtype=f64) if b is None else d(b)
    up = ((Z.sum(-1) + b) if z is None else d(z)) >= 0
    Q = torch.where(up[..., None], Z + gamma * Z.clamp(min=0), Z + gamma * Z.clamp(max=0))
    den = Q.sum(-1) + torch.where(up, b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0))
    return x, W, b, up, Q, den


def linear_gamma_R(x, W, b, R_z, gamma, eps, z=None):
    """R_x[..., k] = sum_n Q_nk R_z_n / stab(den_n) (b: the rule's bias, None if zeroed; z: the
    layer's output, whose sign picks the case)."""
    _, _, _, _, Q, den = _gamma_parts(x, W, b, gamma, z)
    return torch.einsum("...nk,...n->...k", Q, d(R_z) / stab(den, eps))


def linear_gamma_G(x, W, b, G_z, gamma, eps, z=None):
    """Gradient view: R_z = G_z * z (z: the layer's actual output, x W^T + b unless given) and
    G_x[..., k] = sum_n dQ_nk/dx_k R_z_n / stab(den_n) with the ratios held constant. With
    Z_nk = x_k W_nk: dQ_nk/dx_k = W_nk + gamma W_nk^+ where x_k and z_n have the same sign
    (x_k > 0 and z_n >= 0, or x_k < 0 and z_n < 0), else W_nk + gamma W_nk^-; at x_k = 0 the two
    one-sided derivatives are summed (the convention of the generic BasicHook)."""
    x, W, bb, up, _, den = _gamma_parts(x, W, b, gamma, z)
    z = (torch.einsum("...k,nk->...n", x, W) + bb) if z is None else d(z)
    h = d(G_z) * z / stab(den, eps)                                    # [..., n]
    Wp, Wn = W + gamma * W.clamp(min=0), W + gamma * W.clamp(max=0)  # [n, k]
    same = torch.where(up[..., None], Wp, Wn)   # derivative for x_k > 0
    other = torch.where(up[..., None], Wn, Wp)  # derivative for x_k < 0
    pos = torch.einsum("...nk,...n->...k", same, h)
    neg = torch.einsum("...nk,...n->...k", other, h)
    return torch.where(x > 0, pos, torch.where(x < 0, neg, pos + neg))
