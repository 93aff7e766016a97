"""lrp_kernels.rules against the float64 oracle (tests/helpers/oracle.py).

Modules are evaluated in float32 and in float64 (the oracle differentiates a float64 deep copy).
Tolerances: float32 1e-4 relative (norm-wise; the rule divides by stab(y)), float64 1e-9.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lrp_kernels.functional as lf
from lrp_kernels import rules
from helpers import oracle

EPS = 1e-6
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def close(got, want, dtype):
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).norm() / want.norm().clamp_min(1e-30)
    assert torch.isfinite(got).all()
    assert err < TOL[dtype], f"relative error {err:.3g}"


def f64(module):
    return copy.deepcopy(module).double()


class TwoInputs(nn.Module):
    """Several tensor inputs, non-tensor args and kwargs, two outputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, a, b, scale, *, mode="tanh", offset=None):
        assert mode == "tanh" and isinstance(scale, float)
        h = self.lin(a) * torch.tanh(b) * scale
        if offset is not None:
            h = h + offset
        return h, (a * a).sum(-1)


def mlp():
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("recompute", [False, True])
def test_epsilon_multi_input_kwargs_two_outputs(dtype, recompute):
    torch.manual_seed(0)
    m = TwoInputs().to(dtype)
    a = torch.randn(2, 4, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(2, 4, 3, dtype=dtype, requires_grad=True)
    off = torch.randn(3, dtype=dtype)  # a tensor kwarg that needs no grad: a constant
    rule = rules.EpsilonRule(m, epsilon=EPS, recompute=recompute)
    h, s = rule(a, b, 0.5, mode="tanh", offset=off)
    ref_h, ref_s = m(a, b, 0.5, mode="tanh", offset=off)
    assert torch.equal(h, ref_h) and torch.equal(s, ref_s)  # forward identical
    torch.autograd.backward((h, s), (h, s))
    m64 = f64(m)
    want = oracle.generic_epsilon_R(lambda x, y: m64(x, y, 0.5, offset=off.double()), [a, b],
                                    [h, s], EPS)
    close(a.grad, want[0], dtype)
    close(b.grad, want[1], dtype)


def test_only_inputs_requiring_grad_receive_and_uniform_epsilon_counts_them():
    torch.manual_seed(1)
    m = TwoInputs().double()
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64)  # constant
    h, s = rules.UniformEpsilonRule(m, epsilon=EPS)(a, b, 1.0)
    torch.autograd.backward((h, s), (h, s))
    assert b.grad is None
    want = oracle.generic_epsilon_R(lambda x, y: m(x, y, 1.0), [a, b], [h, s], EPS,
                                    receive=[True, False], share=True)
    close(a.grad, want[0], torch.float64)
    # both receive: each gets half of the epsilon relevance
    a2, b2 = a.detach().requires_grad_(), b.clone().requires_grad_()
    h, s = rules.UniformEpsilonRule(m, epsilon=EPS)(a2, b2, 1.0)
    torch.autograd.backward((h, s), (h, s))
    want = oracle.generic_epsilon_R(lambda x, y: m(x, y, 1.0), [a2, b2], [h, s], EPS, share=True)
    close(a2.grad, want[0], torch.float64)
    close(b2.grad, want[1], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_epsilon_on_mlp_and_linear_fast_path(dtype):
    torch.manual_seed(2)
    m = mlp().to(dtype)
    x = torch.randn(3, 5, 6, dtype=dtype, requires_grad=True)
    y = rules.EpsilonRule(m)(x)
    y.backward(y)
    close(x.grad, oracle.generic_epsilon_R(f64(m), [x], [y], EPS)[0], dtype)
    # nn.Linear routes to the fused op: same rule as the oracle's linear epsilon
    lin = m[0]
    x2 = x.detach()[:, ::2].requires_grad_()  # non-contiguous
    z = rules.EpsilonRule(lin)(x2)
    assert z.grad_fn.name().startswith("LinearEpsilonFn")
    z.backward(z)
    close(x2.grad, oracle.linear_epsilon_R(x2, lin.weight, lin.bias, z, EPS), dtype)


def test_gradient_view_times_input_equals_relevance_view():
    torch.manual_seed(3)
    m = TwoInputs().double()
    a = torch.randn(2, 5, dtype=torch.float64)
    b = torch.randn(2, 3, dtype=torch.float64)
    for cls in (rules.EpsilonRule, rules.UniformEpsilonRule, rules.TaylorDecompositionRule):
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        h, s = cls(m)(ar, br, 1.0)
        torch.autograd.backward((h, s), (h, s))  # R_y = y
        ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
        h, s = cls(m, relevance=False)(ag, bg, 1.0)
        torch.autograd.backward((h, s), (torch.ones_like(h), torch.ones_like(s)))  # G_y = 1
        close(ag * ag.grad, ar.grad, torch.float64)
        close(bg * bg.grad, br.grad, torch.float64)


class Mul(nn.Module):
    def forward(self, a, b):
        return a * b


class Matmul(nn.Module):
    def forward(self, a, b):
        return a @ b


def test_uniform_rule_matches_mul2_and_oracle():
    torch.manual_seed(4)
    a = torch.randn(4, 1, 6, requires_grad=True)  # broadcast
    b = torch.randn(4, 5, 6, requires_grad=True)
    y = rules.UniformRule(Mul())(a, b)
    y.backward(y)
    ra, rb = oracle.mul_R(a, b, y)
    close(a.grad, ra, torch.float32)
    close(b.grad, rb, torch.float32)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    z = lf.mul2(a2, b2)
    z.backward(z)
    close(a.grad, a2.grad, torch.float32)
    # one constant factor: the other gets everything
    a3 = a.detach().clone().requires_grad_()
    y = rules.UniformRule(Mul())(a3, b.detach())
    y.backward(y)
    close(a3.grad, oracle.mul_R(a3, b, y, b_const=True)[0], torch.float32)
    # gradient view: G_a = G_z * b / 2
    a4, b4 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y = rules.UniformRule(Mul(), epsilon=0.0, relevance=False)(a4, b4)  # G_a = (G_z z / 2) / a
    g = torch.randn_like(y)
    y.backward(g)
    close(a4.grad, oracle.mul_G(a4, b4, g)[0], torch.float64)


def test_uniform_epsilon_on_matmul_matches_oracle_and_drop_in():
    torch.manual_seed(5)
    A = torch.randn(2, 3, 4, 5, requires_grad=True)
    B = torch.randn(3, 5, 7, requires_grad=True)  # broadcast batch
    O = rules.UniformEpsilonRule(Matmul())(A, B)
    O.backward(O)
    ra, rb = oracle.matmul_R(A, B, O, EPS)
    close(A.grad, ra, torch.float32)
    close(B.grad, rb, torch.float32)
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    O2 = lf.matmul(A2, B2)
    O2.backward(O2)
    close(A.grad, A2.grad, torch.float32)
    close(B.grad, B2.grad, torch.float32)


def test_identity_rule_and_its_errors():
    torch.manual_seed(6)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = rules.IdentityRule(nn.SiLU())(x)
    r = torch.randn_like(y)
    y.backward(r)
    assert torch.equal(x.grad, r)
    xg = x.detach().clone().requires_grad_()
    y = rules.IdentityRule(nn.SiLU(), relevance=False)(xg)
    y.backward(r)
    close(xg.grad, oracle.identity_G(torch.nn.functional.silu, xg, r, EPS), torch.float64)
    with pytest.raises(ValueError, match="exactly one input"):
        rules.IdentityRule(Mul())(x, x.detach().clone().requires_grad_())
    with pytest.raises(ValueError, match="does not broadcast"):
        rules.IdentityRule(nn.Linear(8, 3).double())(x)


def test_stop_relevance_rule():
    torch.manual_seed(7)
    l1, l2 = nn.Linear(4, 4), nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    y = rules.EpsilonRule(l1)(x) + rules.StopRelevanceRule(l2)(x)
    assert torch.allclose(y, l1(x) + l2(x))
    y.sum().backward()
    # only the l1 branch reaches x (its epsilon rule); l2 contributes nothing
    x3 = x.detach().clone().requires_grad_()
    z = rules.EpsilonRule(l1)(x3)
    z.backward(torch.ones_like(z))
    assert torch.equal(x.grad, x3.grad)


@pytest.mark.parametrize("dim", [-1, 1])
def test_taylor_with_bias_on_softmax_is_the_softmax_rule(dim):
    torch.manual_seed(8)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    s = rules.TaylorDecompositionRule(nn.Softmax(dim=dim), bias=True, epsilon=0.0)(x)
    r = torch.randn_like(s)
    s.backward(r)
    close(x.grad, oracle.softmax_R(x, r, dim=dim), torch.float64)
    x2 = x.detach().clone().requires_grad_()
    s2 = lf.softmax(x2, dim)
    s2.backward(r)
    close(x.grad, x2.grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_taylor_without_bias_and_reference_point(dtype):
    torch.manual_seed(9)
    m = mlp().to(dtype)
    x = torch.randn(3, 6, dtype=dtype, requires_grad=True)
    ref = 0.1 * torch.randn(6, dtype=dtype)
    y = rules.TaylorDecompositionRule(m, bias=False, reference=ref)(x)
    y.backward(y)
    want = oracle.generic_taylor_R(f64(m), [x], [y], EPS, bias=False, reference=[ref])[0]
    close(x.grad, want, dtype)
    # without bias the relevance is conserved, row by row (eps -> 0)
    xc = x.detach().clone().requires_grad_()
    y = rules.TaylorDecompositionRule(m, bias=False, reference=ref, epsilon=1e-12)(xc)
    y.backward(y)
    torch.testing.assert_close(xc.grad.sum(-1), y.detach().sum(-1), rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-6)
    # with bias and a callable reference
    x2 = x.detach().clone().requires_grad_()
    y = rules.TaylorDecompositionRule(m, bias=True, reference=lambda t: torch.zeros_like(t) + ref)(x2)
    y.backward(y)
    want = oracle.generic_taylor_R(f64(m), [x2], [y], EPS, bias=True, reference=[ref])[0]
    close(x2.grad, want, dtype)
    with pytest.raises(ValueError, match="reference"):
        rules.TaylorDecompositionRule(m, reference=torch.zeros(5, dtype=dtype))(x.detach().requires_grad_())


@pytest.mark.parametrize("recompute", [False, True])
def test_module_called_twice_in_one_forward(recompute):
    torch.manual_seed(10)
    inner = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()
    shared = rules.EpsilonRule(inner, recompute=recompute)
    state_before = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(shared).items()}
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mid = shared(x)
    y = shared(mid * 1.5)  # the second call sees another input
    y.backward(y)
    # chain the oracle: R_mid from the second call, then x through the first
    (r_mid_in,) = oracle.generic_epsilon_R(inner, [mid * 1.5], [y], EPS)
    r_mid = r_mid_in * 1.5  # the plain "* 1.5" backward multiplies by 1.5
    (want,) = oracle.generic_epsilon_R(inner, [x], [r_mid], EPS)
    close(x.grad, want, torch.float64)
    assert {k: dict(v) if isinstance(v, dict) else v for k, v in vars(shared).items()} == state_before


@pytest.mark.parametrize("recompute", [False, True])
def test_gradient_checkpointing_gives_the_same_relevance(recompute):
    torch.manual_seed(11)
    blocks = nn.ModuleList([rules.EpsilonRule(mlp(), recompute=recompute),
                            rules.UniformEpsilonRule(Mul(), recompute=recompute)])
    x = torch.randn(3, 6)

    def run(x, ckpt):
        def body(t):
            h = blocks[0](t)
            return blocks[1](h, torch.tanh(t))
        return checkpoint(body, x, use_reentrant=False) if ckpt else body(x)

    grads = []
    for ckpt in (False, True):
        xi = x.clone().requires_grad_()
        y = run(xi, ckpt)
        y.backward(y)
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_recompute_restores_rng_so_dropout_masks_match():
    torch.manual_seed(12)
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).train()
    x = torch.randn(4, 8)
    out = []
    for recompute in (False, True):
        torch.manual_seed(0)
        xi = x.clone().requires_grad_()
        y = rules.EpsilonRule(m, recompute=recompute)(xi)
        y.backward(y)
        out.append((y, xi.grad))
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_no_grad_and_no_receiver_calls_the_module_plainly():
    m = mlp()
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(rules.EpsilonRule(m)(x), m(x))
    y = rules.EpsilonRule(m)(x)  # x needs no grad; parameters do: plain call, plain graph
    assert torch.equal(y, m(x))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        rules.EpsilonRule(torch.tanh)
    with pytest.raises(ValueError, match="epsilon"):
        rules.EpsilonRule(nn.Tanh(), epsilon=-1.0)


def test_wrapper_exposes_the_wrapped_attributes_and_repr():
    lin = nn.Linear(3, 4)
    r = rules.EpsilonRule(lin, epsilon=1e-3)
    assert r.weight is lin.weight and r.in_features == 3 and r.module is lin
    assert "EpsilonRule" in repr(r) and "epsilon=0.001" in repr(r) and "Linear" in repr(r)
    assert [n for n, _ in r.named_parameters()] == ["module.weight", "module.bias"]


def test_bfloat16_module_against_the_float64_oracle():
    torch.manual_seed(13)
    m = mlp()
    x = torch.randn(4, 6)
    mb = copy.deepcopy(m).bfloat16()
    xb = x.bfloat16().requires_grad_()
    y = rules.EpsilonRule(nn.Sequential(*list(mb)[:2]))(xb)  # Linear + Tanh, generic VJP path
    y.backward(y)
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    # the oracle on the same (bf16-rounded) weights and input, in float64
    ref = oracle.generic_epsilon_R(f64(nn.Sequential(*list(mb)[:2])), [xb.detach()], [y], EPS)[0]
    err = (xb.grad.double() - ref).norm() / ref.norm()
    assert err < 3e-2, f"relative error {err:.3g}"  # bf16 forward/VJP arithmetic


def test_recompute_replays_autocast():
    torch.manual_seed(14)
    m = mlp()
    x = torch.randn(3, 6)
    out = []
    for recompute in (False, True):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = rules.EpsilonRule(m, recompute=recompute)(xi)
        assert y.dtype == torch.bfloat16
        y.backward(y)  # outside autocast: the re-run must still compute in bf16
        out.append(xi.grad)
    torch.testing.assert_close(out[1], out[0])
