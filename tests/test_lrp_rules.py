"""Classic LRP rules against a float64 reference built from the layer's explicit matrix.

The reference never calls the rules: a Linear layer is its weight matrix ``W``; a convolution
is unfolded here into its Toeplitz matrix ``M`` (one row per output element, one column per
input element) by index arithmetic from the kernel, stride, padding, dilation and groups, and
checked against ``F.conv`` first. Each rule is then the explicit formula on
``Z_kj = M_kj x_j`` (see the table in lrp_kernels/hooks/rules.py). The ``linear_gamma_backward``
op behind ``Gamma`` on ``nn.Linear`` is checked per backend in tests/ops/test_linear_gamma.py.
"""
import itertools

import pytest
import torch
from torch import nn

from lrp_kernels.hooks import rules as R

f64 = torch.float64


# ----------------------------------------------------------------------------- explicit matrices

def toeplitz(conv: nn.Module, in_shape):
    """(M, C): M[out_flat, in_flat] the conv as a matrix, C the 0/1 connectivity (in range)."""
    w = conv.weight.detach().to(f64)
    cin, *spatial = in_shape
    cout, cin_g, *ks = w.shape
    nd = len(spatial)
    groups = conv.groups
    cout_g = cout // groups
    st, pd, dl = conv.stride, conv.padding, conv.dilation
    out_sp = [(spatial[d] + 2 * pd[d] - dl[d] * (ks[d] - 1) - 1) // st[d] + 1 for d in range(nd)]
    n_in = cin * int(torch.tensor(spatial).prod())
    n_out = cout * int(torch.tensor(out_sp).prod())
    M = torch.zeros(n_out, n_in, dtype=f64)
    C = torch.zeros(n_out, n_in, dtype=f64)

    def flat(c, pos, sp):
        idx = c
        for p, s in zip(pos, sp):
            idx = idx * s + p
        return idx

    for co in range(cout):
        g = co // cout_g
        for opos in itertools.product(*[range(s) for s in out_sp]):
            row = flat(co, opos, out_sp)
            for ci in range(cin_g):
                cin_abs = g * cin_g + ci
                for kpos in itertools.product(*[range(k) for k in ks]):
                    ipos = [opos[d] * st[d] - pd[d] + kpos[d] * dl[d] for d in range(nd)]
                    if all(0 <= ipos[d] < spatial[d] for d in range(nd)):
                        col = flat(cin_abs, ipos, spatial)
                        M[row, col] += w[(co, ci) + tuple(kpos)]
                        C[row, col] = 1.0
    bias = None
    if conv.bias is not None:
        bias = conv.bias.detach().to(f64).repeat_interleave(int(torch.tensor(out_sp).prod()))
    return M, C, bias, (cout, *out_sp)


def linear_matrix(lin: nn.Linear):
    W = lin.weight.detach().to(f64)
    b = None if lin.bias is None else lin.bias.detach().to(f64)
    return W, torch.ones_like(W), b


# ----------------------------------------------------------------------------- reference rules

def stab(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def pos(t):
    return t.clamp(min=0)


def neg(t):
    return t.clamp(max=0)


def ref_rule(name, x, M, C, b, R_out, eps, layer_bias=None, **kw):
    """x: [n_in], M/C: [n_out, n_in], b: the rule's bias [n_out] or None (zeroed / absent),
    layer_bias: the layer's own bias (defaults to b; Gamma's case is the sign of the layer's
    output), R_out: [n_out] -> R_x [n_in]."""
    z_layer = (M * x[None, :]).sum(1) + (layer_bias if layer_bias is not None
                                         else b if b is not None else 0.0)
    b = torch.zeros(M.shape[0], dtype=f64) if b is None else b
    Z = M * x[None, :]
    if name == "epsilon":
        return (Z / stab(Z.sum(1) + b, eps)[:, None] * R_out[:, None]).sum(0)
    if name in ("zplus", "alphabeta"):
        Qp, Qn = pos(Z), neg(Z)
        Rp = (Qp / stab(Qp.sum(1) + pos(b), eps)[:, None] * R_out[:, None]).sum(0)
        if name == "zplus":
            return Rp
        Rn = (Qn / stab(Qn.sum(1) + neg(b), eps)[:, None] * R_out[:, None]).sum(0)
        return kw["alpha"] * Rp - kw["beta"] * Rn
    if name == "gamma":
        g = kw["gamma"]
        z = z_layer
        up = (z >= 0)[:, None]
        Q = torch.where(up, Z + g * pos(Z), Z + g * neg(Z))
        den = Q.sum(1) + torch.where(z >= 0, b + g * pos(b), b + g * neg(b))
        return (Q / stab(den, eps)[:, None] * R_out[:, None]).sum(0)
    if name == "flat":
        return (C / stab(C.sum(1), eps)[:, None] * R_out[:, None]).sum(0)
    if name == "wsquare":  # every parameter squared, the bias too
        Q = M * M
        return (Q / stab(Q.sum(1) + b * b, eps)[:, None] * R_out[:, None]).sum(0)
    if name == "zbox":
        lo, hi = kw["low"], kw["high"]
        Q = Z - lo[None, :] * pos(M) - hi[None, :] * neg(M)
        return (Q / stab(Q.sum(1), eps)[:, None] * R_out[:, None]).sum(0)
    raise ValueError(name)


EPS = 1e-6


def make_rule(name, relevance=True, zero_params=None, **kw):
    if name == "epsilon":
        return R.Epsilon(EPS, zero_params=zero_params, relevance=relevance)
    if name == "zplus":
        return R.ZPlus(EPS, zero_params=zero_params, relevance=relevance)
    if name == "alphabeta":
        return R.AlphaBeta(kw["alpha"], kw["beta"], EPS, zero_params=zero_params, relevance=relevance)
    if name == "gamma":
        return R.Gamma(kw["gamma"], EPS, zero_params=zero_params, relevance=relevance)
    if name == "flat":
        return R.Flat(EPS, zero_params=zero_params)
    if name == "wsquare":
        return R.WSquare(EPS, zero_params=zero_params)
    if name == "zbox":
        return R.ZBox(kw["low"], kw["high"], EPS, zero_params=zero_params)
    raise ValueError(name)


RULES = [
    ("epsilon", {}),
    ("zplus", {}),
    ("alphabeta", {"alpha": 2.0, "beta": 1.0}),
    ("alphabeta", {"alpha": 1.0, "beta": 0.0}),
    ("gamma", {"gamma": 0.25}),
    ("gamma", {"gamma": 0.0}),
    ("gamma", {"gamma": 100.0}),
    ("flat", {}),
    ("wsquare", {}),
    ("zbox", {}),
]
GRADIENT_VIEW = {"epsilon", "zplus", "alphabeta", "gamma"}


def layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(7, 5), (3, 7)),
        "conv1d": (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
        "conv2d": (nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2), (2, 4, 6, 5)),
        "conv3d": (nn.Conv3d(2, 3, 2, stride=1, padding=1), (1, 2, 3, 3, 3)),
    }


_CACHE = {}


def explicit(layer, x_shape):
    if isinstance(layer, nn.Linear):
        return linear_matrix(layer)
    # the Python-loop unfolding is the slow part: cache it per weight (biases vary per test)
    key = (type(layer), tuple(x_shape), layer.weight.detach().double().sum().item())
    if key not in _CACHE:
        _CACHE[key] = toeplitz(layer, x_shape[1:])[:2]
    M, C = _CACHE[key]
    b = None if layer.bias is None else layer.bias.detach().to(f64).repeat_interleave(M.shape[0] // layer.out_channels)
    return M, C, b


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
def test_toeplitz_matches_conv(kind):
    layer, shape = layers()[kind]
    layer = layer.double()
    x = torch.randn(shape, dtype=f64)
    M, _, b, out_shape = toeplitz(layer, shape[1:])
    ref = x.reshape(shape[0], -1) @ M.T + b
    assert torch.allclose(layer(x).reshape(shape[0], -1), ref, atol=1e-12)


def run_rule(rule, layer, x, R_out_fn, relevance):
    """Apply ``rule`` to ``layer``; returns (relevance of x, output relevance used)."""
    handle = rule.register(layer)
    try:
        x = x.clone().requires_grad_(True)
        y = layer(x)
        R_y = R_out_fn(y.detach())
        g = R_y if relevance else R_y / y.detach()
        y.backward(g)
    finally:
        handle.remove()
    R_x = x.grad if relevance else x.detach() * x.grad
    return R_x, R_y


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("name,kw", RULES, ids=[f"{n}{'-'.join(str(v) for v in k.values())}" for n, k in RULES])
@pytest.mark.parametrize("bias", ["bias", "no_bias", "zero_params"])
def test_rule_matches_explicit_matrix(kind, name, kw, bias):
    layer, shape = layers()[kind]
    torch.manual_seed(1)
    layer = layer.double()
    if bias == "no_bias":
        layer.bias = None
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    x = torch.randn(shape, dtype=f64)
    kw = dict(kw)
    if name == "zbox":
        x = x.clamp(-1.5, 1.5)
        kw["low"] = torch.full(shape, -1.5, dtype=f64)
        kw["high"] = torch.full(shape, 1.5, dtype=f64)
        kw["low"][..., 0] = -2.0  # bounds that vary over the input
    zp = "bias" if bias == "zero_params" else None
    M, C, b = explicit(layer, shape)
    layer_bias = b
    if zp:
        b = None
    rule = make_rule(name, zero_params=zp, **kw)
    R_x, R_y = run_rule(rule, layer, x, lambda y: torch.randn_like(y), relevance=True)
    for n in range(shape[0]):
        extra = {}
        if name == "zbox":
            extra = {"low": kw["low"][n].reshape(-1), "high": kw["high"][n].reshape(-1)}
        ref = ref_rule(name, x[n].reshape(-1), M, C, b, R_y[n].reshape(-1), EPS, layer_bias=layer_bias,
                       **{**kw, **extra})
        got = R_x[n].reshape(-1)
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10), (name, kind, bias, (got - ref).abs().max())


@pytest.mark.parametrize("zero_params", [None, "bias"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("name,kw", [r for r in RULES if r[0] in GRADIENT_VIEW],
                         ids=[f"{n}{'-'.join(str(v) for v in k.values())}" for n, k in RULES if n in GRADIENT_VIEW])
def test_gradient_view_gives_same_relevance(kind, name, kw, zero_params):
    """Gradient view: R_y = y * G_y with y the layer's actual output (bias included even when
    the rule zeroes it); relevance x * G_x equals the relevance-view reference."""
    layer, shape = layers()[kind]
    torch.manual_seed(2)
    layer = layer.double()
    x = torch.randn(shape, dtype=f64)
    M, C, b = explicit(layer, shape)
    rule = make_rule(name, relevance=False, zero_params=zero_params, **kw)
    R_x, R_y = run_rule(rule, layer, x, lambda y: torch.randn_like(y), relevance=False)
    for n in range(shape[0]):
        ref = ref_rule(name, x[n].reshape(-1), M, C, None if zero_params else b, R_y[n].reshape(-1), EPS,
                       layer_bias=b, **kw)
        assert torch.allclose(R_x[n].reshape(-1), ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name,kw", [("epsilon", {}), ("gamma", {"gamma": 0.5}), ("alphabeta", {"alpha": 2.0, "beta": 1.0})])
def test_float32_rule_close_to_float64_reference(name, kw):
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 5, 3, padding=1)
    shape = (2, 3, 5, 5)
    x = torch.randn(shape)
    M, C, b = explicit(layer, shape)
    R_x, R_y = run_rule(make_rule(name, **kw), layer, x, lambda y: y.clone(), relevance=True)
    for n in range(2):
        ref = ref_rule(name, x[n].reshape(-1).double(), M, C, b, R_y[n].reshape(-1).double(), EPS, **kw)
        err = (R_x[n].reshape(-1).double() - ref).norm() / ref.norm()
        assert err < 1e-4, err


def test_conservation_without_bias():
    """alpha - beta = 1, ZPlus, Gamma, Flat, WSquare conserve relevance when there is no bias."""
    torch.manual_seed(4)
    layer = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():  # every output has a positive and a negative contribution
        layer.weight[:, 0], layer.weight[:, 1] = 1.0, -1.0
    x = torch.randn(3, 6, dtype=f64)
    x[:, :2] = 1.0
    for rule in [R.ZPlus(), R.AlphaBeta(2, 1), R.Gamma(0.5), R.Flat(), R.WSquare(), R.Epsilon(1e-12)]:
        R_x, R_y = run_rule(rule, layer, x, lambda y: torch.randn_like(y), relevance=True)
        assert torch.allclose(R_x.sum(1), R_y.sum(1), atol=1e-8), type(rule).__name__


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("relevance", [True, False])
def test_gamma_without_bias_takes_the_case_from_the_original_output(kind, relevance):
    """zero_params="bias" removes the bias from the rule's ratios, not from the output whose sign
    picks the case: with biases large enough to flip output signs, the result follows the sign
    of the layer's actual output (and differs from deciding it without the bias)."""
    layer, shape = layers()[kind]
    torch.manual_seed(7)
    layer = layer.double()
    with torch.no_grad():
        layer.bias.copy_(torch.randn_like(layer.bias) * 5)
    x = torch.randn(shape, dtype=f64)
    M, C, b = explicit(layer, shape)
    rule = R.Gamma(0.5, EPS, zero_params="bias", relevance=relevance)
    R_x, R_y = run_rule(rule, layer, x, lambda y: torch.randn_like(y), relevance=relevance)
    flipped = 0
    for n in range(shape[0]):
        xn, rn = x[n].reshape(-1), R_y[n].reshape(-1)
        flipped += int((((M * xn).sum(1) >= 0) != ((M * xn).sum(1) + b >= 0)).sum())
        right = ref_rule("gamma", xn, M, C, None, rn, EPS, layer_bias=b, gamma=0.5)
        wrong = ref_rule("gamma", xn, M, C, None, rn, EPS, gamma=0.5)
        assert torch.allclose(R_x[n].reshape(-1), right, rtol=1e-8, atol=1e-9)
        assert not torch.allclose(right, wrong, rtol=1e-3, atol=1e-6)
    assert flipped > 0  # the case really differs for some outputs


def test_wsquare_squares_the_bias_unless_zeroed():
    """WSquare keeps ``b^2`` in the denominator (Zennit's convention): relevance sums to
    ``sum_k R_k * sum_j w_jk^2 / (sum_j w_jk^2 + b_k^2)``; with zero_params="bias" it conserves."""
    torch.manual_seed(8)
    layer = nn.Linear(5, 3).double()
    x = torch.randn(2, 5, dtype=f64)
    w2 = (layer.weight.detach() ** 2).sum(1)
    share = w2 / (w2 + layer.bias.detach() ** 2)
    R_x, R_y = run_rule(R.WSquare(1e-12), layer, x, lambda y: torch.randn_like(y), relevance=True)
    assert torch.allclose(R_x.sum(1), (R_y * share).sum(1), atol=1e-10)
    R_x, R_y = run_rule(R.WSquare(1e-12, zero_params="bias"), layer, x, lambda y: torch.randn_like(y), relevance=True)
    assert torch.allclose(R_x.sum(1), R_y.sum(1), atol=1e-10)


def test_alphabeta_refuses_pairs_that_do_not_conserve():
    for alpha, beta in [(1.0, 1.0), (2.0, 0.0), (3.0, 1.0)]:
        with pytest.raises(ValueError, match="alpha - beta = 1"):
            R.AlphaBeta(alpha, beta)
    assert R.AlphaBeta(1.5, 0.5).alpha == 1.5


def test_epsilon_linear_fast_path_matches_generic():
    """Epsilon on nn.Linear goes through the linear_epsilon_backward kernel op; the generic
    BasicHook (default arguments) gives the same numbers, in both views."""
    from lrp_kernels.hooks.core import BasicHook
    torch.manual_seed(5)
    layer = nn.Linear(8, 5).double()
    x = torch.randn(4, 8, dtype=f64)
    for relevance in (True, False):
        a, _ = run_rule(R.Epsilon(1e-3, relevance=relevance), layer, x, lambda y: y.clone(), relevance)
        b, _ = run_rule(BasicHook(stabilizer=1e-3, relevance=relevance), layer, x, lambda y: y.clone(), relevance)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_norm_rule_on_pooling_matches_explicit():
    torch.manual_seed(6)
    pool = nn.AvgPool2d(2)
    x = torch.randn(1, 2, 4, 4, dtype=f64)
    # avg-pool as a matrix: each output is 1/4 of its window
    M = torch.zeros(8, 32, dtype=f64)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for di in range(2):
                    for dj in range(2):
                        M[c * 4 + i * 2 + j, c * 16 + (2 * i + di) * 4 + 2 * j + dj] = 0.25
    R_x, R_y = run_rule(R.Norm(), pool, x, lambda y: torch.randn_like(y), relevance=True)
    ref = ref_rule("epsilon", x.reshape(-1), M, None, None, R_y.reshape(-1), EPS)
    assert torch.allclose(R_x.reshape(-1), ref, rtol=1e-9, atol=1e-10)


def test_pass_rule_passes_relevance():
    act = nn.Tanh()
    x = torch.randn(3, 4, requires_grad=True)
    h = R.Pass().register(act)
    y = act(x)
    r = torch.randn_like(y)
    y.backward(r)
    h.remove()
    assert torch.equal(x.grad, r)


def test_rules_without_gradient_view_refuse_it():
    for cls, args in [(R.Flat, ()), (R.WSquare, ()), (R.ZBox, (0.0, 1.0))]:
        with pytest.raises(ValueError, match="no gradient view"):
            cls(*args, relevance=False)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="gamma"):
        R.Gamma(-1.0)
    with pytest.raises(ValueError, match="alpha"):
        R.AlphaBeta(-2.0, 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        R.Epsilon(-1e-3)
    with pytest.raises(ValueError, match="min or max"):
        R.ClampMod()


def test_rule_copies_keep_their_arguments():
    for rule, attrs in [(R.Gamma(0.7, zero_params="bias"), {"gamma": 0.7}),
                        (R.AlphaBeta(3.0, 2.0), {"alpha": 3.0, "beta": 2.0}),
                        (R.ZBox(-1.0, 2.0), {"low": -1.0, "high": 2.0}),
                        (R.Epsilon(0.3), {"epsilon": 0.3})]:
        c = rule.copy()
        assert type(c) is type(rule) and c is not rule
        for k, v in attrs.items():
            assert getattr(c, k) == v
        assert c.param_modifiers[0] is not rule.param_modifiers[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,kw", [("epsilon", {}), ("gamma", {"gamma": 0.25}), ("zplus", {})])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_rules_on_cuda_match_float64_reference(name, kw, kind):
    """fp32 on the GPU (Epsilon on Linear runs the fused linear_epsilon_backward kernel)."""
    layer, shape = layers()[kind]
    torch.manual_seed(9)
    x = torch.randn(shape)
    M, C, b = explicit(layer, shape)
    R_x, R_y = run_rule(make_rule(name, **kw), layer.cuda(), x.cuda(), lambda y: y.clone(), relevance=True)
    for n in range(shape[0]):
        ref = ref_rule(name, x[n].reshape(-1).double(), M, C, b, R_y[n].reshape(-1).double().cpu(), EPS, **kw)
        err = (R_x[n].reshape(-1).double().cpu() - ref).norm() / ref.norm()
        assert err < 1e-4, err  # TF32 is off by default for fp32 matmuls in torch


@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("zero_params", [None, "bias"])
def test_gamma_linear_kernel_op_matches_generic_basic_hook(relevance, zero_params):
    """Gamma on nn.Linear runs the linear_gamma_backward op; a callable stabiliser forces the
    generic four-copy BasicHook path: same numbers (inputs with exact zeros, 3-D batch)."""
    from lrp_kernels.hooks.core import stabilize
    torch.manual_seed(10)
    layer = nn.Linear(9, 7).double()
    x = torch.randn(2, 3, 9, dtype=f64)
    x[0, 0, :3] = 0.0
    r_out = torch.randn(2, 3, 7, dtype=f64)
    fused, _ = run_rule(R.Gamma(0.3, 1e-4, zero_params=zero_params, relevance=relevance), layer, x,
                        lambda y: r_out, relevance)
    generic, _ = run_rule(R.Gamma(0.3, lambda z: stabilize(z, 1e-4), zero_params=zero_params, relevance=relevance),
                          layer, x, lambda y: r_out, relevance)
    assert torch.allclose(fused, generic, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("name,kw", [("epsilon", {}), ("gamma", {"gamma": 0.25}), ("alphabeta", {"alpha": 2.0, "beta": 1.0})])
def test_bfloat16_rules_close_to_float64_reference(kind, name, kw):
    """bf16 layers: the result is bf16 and within 3e-2 (norm-wise) of float64 on the same
    (rounded) weights and inputs; stabilisers run in float32."""
    layer, shape = layers()[kind]
    torch.manual_seed(14)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    M, C, b = explicit(layer, shape)
    R_x, R_y = run_rule(make_rule(name, **kw), layer, x, lambda y: y.clone(), relevance=True)
    assert R_x.dtype == torch.bfloat16 and torch.isfinite(R_x).all()
    for n in range(shape[0]):
        ref = ref_rule(name, x[n].reshape(-1).double(), M, C, b, R_y[n].reshape(-1).double(), EPS, **kw)
        err = (R_x[n].reshape(-1).double() - ref).norm() / ref.norm()
        assert err < 3e-2, err
