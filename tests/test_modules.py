"""Drop-in modules: same constructor / parameters / state_dict as the torch modules they
replace, forward equal to them, backward equal to the functional rules (both views)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import modules as M
from test_functional import gen_for, rand, rel_err


def _relevance(module_or_fn, *inputs, start=None):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = module_or_fn(*xs)
    out.backward(out.detach() if start is None else start)
    return out, [t.grad for t in xs]


# ---- LinearEpsilon ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_epsilon_is_an_nn_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(9, 5, bias=bias, dtype=torch.float64)
    mod = M.LinearEpsilon(9, 5, bias=bias, dtype=torch.float64)
    assert isinstance(mod, nn.Linear)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in mod.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    mod.load_state_dict(ref.state_dict())
    ref.load_state_dict(mod.state_dict())
    x = rand(gen_for("lin-mod", bias), (2, 3, 9), torch.float64, "transposed")
    torch.testing.assert_close(mod(x), ref(x), rtol=0, atol=0)
    _, (r_mod,) = _relevance(mod, x)
    _, (r_fn,) = _relevance(lambda t: F.linear_epsilon(t, ref.weight, ref.bias), x)
    torch.testing.assert_close(r_mod, r_fn, rtol=0, atol=0)
    assert "epsilon=" in repr(mod)


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_parameters(bias):
    lin = nn.Linear(6, 4, bias=bias).eval()
    mod = M.LinearEpsilon.from_linear(lin, epsilon=1e-4)
    assert mod.weight is lin.weight
    assert (mod.bias is lin.bias) if bias else mod.bias is None
    assert list(mod.state_dict()) == list(lin.state_dict())
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in lin.named_parameters()]
    assert mod.training == lin.training
    assert (mod.in_features, mod.out_features, mod.epsilon) == (6, 4, 1e-4)
    with torch.no_grad():
        lin.weight.mul_(2)  # no copy: changes show through
    x = torch.randn(3, 6)
    torch.testing.assert_close(mod(x), lin(x), rtol=0, atol=0)


def test_linear_epsilon_gradient_view_and_deepcopy():
    mod = M.LinearEpsilon(7, 3, dtype=torch.float64, relevance=False)
    x = rand(gen_for("lin-g"), (4, 7), torch.float64)
    _, (g_mod,) = _relevance(mod, x, start=torch.ones(4, 3, dtype=torch.float64))
    _, (g_fn,) = _relevance(lambda t: G.linear_epsilon(t, mod.weight, mod.bias), x,
                            start=torch.ones(4, 3, dtype=torch.float64))
    torch.testing.assert_close(g_mod, g_fn, rtol=0, atol=0)
    twin = copy.deepcopy(mod)
    assert twin.weight is not mod.weight and torch.equal(twin.weight, mod.weight)
    assert (twin.epsilon, twin.relevance) == (mod.epsilon, mod.relevance)


# ---- norms -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_identity_is_an_nn_layer_norm(affine, bias):
    ref = nn.LayerNorm(11, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=torch.float64)
    mod = M.LayerNormIdentity(11, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if bias:
                ref.bias.normal_()
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    x = rand(gen_for("ln-mod", affine, bias), (2, 5, 11), torch.float64, "sliced")
    torch.testing.assert_close(mod(x), ref(x))
    _, (r_mod,) = _relevance(mod, x)
    _, (r_fn,) = _relevance(lambda t: F.layer_norm(t, mod.weight, mod.bias, 1e-5), x)
    torch.testing.assert_close(r_mod, r_fn, rtol=0, atol=0)


def test_layer_norm_identity_errors():
    with pytest.raises(ValueError, match="last dim"):
        M.LayerNormIdentity((4, 5))
    mod = M.LayerNormIdentity(8, elementwise_affine=False)
    with pytest.raises(ValueError, match="8"):
        mod(torch.randn(2, 6))


def test_rms_norm_identity_module():
    ref = nn.RMSNorm(10, eps=1e-6, dtype=torch.float64)
    mod = M.RMSNormIdentity(10, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    x = rand(gen_for("rms-mod"), (3, 10), torch.float64, "transposed")
    torch.testing.assert_close(mod(x), ref(x))
    start = torch.randn(3, 10, dtype=torch.float64)
    _, (r_mod,) = _relevance(mod, x, start=start)
    torch.testing.assert_close(r_mod, start, rtol=0, atol=0)  # identity rule
    mod_g = M.RMSNormIdentity(10, eps=1e-6, dtype=torch.float64, relevance=False)
    mod_g.load_state_dict(ref.state_dict())
    _, (g_mod,) = _relevance(mod_g, x, start=start)
    _, (g_fn,) = _relevance(lambda t: G.rms_norm_identity(t, mod.weight, 1e-6), x, start=start)
    torch.testing.assert_close(g_mod, g_fn, rtol=0, atol=0)


# ---- softmax and the small wrappers ----------------------------------------------------------------

@pytest.mark.parametrize("dim,temperature", [(-1, 1.0), (1, 0.5)])
def test_softmax_dt_module(dim, temperature):
    x = rand(gen_for("sm-mod", dim), (2, 6, 5), torch.float64, "transposed")
    mod = M.SoftmaxDT(dim=dim, temperature=temperature)
    torch.testing.assert_close(mod(x), nn.Softmax(dim=dim)(x / temperature))
    _, (r_mod,) = _relevance(mod, x)
    _, (r_fn,) = _relevance(lambda t: F.softmax(t, dim, None, temperature), x)
    torch.testing.assert_close(r_mod, r_fn, rtol=0, atol=0)
    assert "temperature" in repr(mod)


def test_softmax_dt_module_dtype_arg():
    x = rand(gen_for("sm-dtype"), (3, 7), torch.bfloat16)
    mod = M.SoftmaxDT(dim=-1, dtype=torch.float32)
    y = mod(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.softmax(x, -1, dtype=torch.float32))
    y.backward(y.detach())
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("relevance", [True, False])
def test_wrapper_modules_equal_functional(relevance):
    V = F if relevance else G
    gen = gen_for("wrappers", relevance)
    a = rand(gen, (2, 4, 5), torch.float64, "transposed")
    b = rand(gen, (4, 5), torch.float64)
    c = rand(gen, (2, 5, 3), torch.float64)
    pairs = [
        (M.AddEpsilon(epsilon=1e-5, relevance=relevance), lambda x, y: V.add2(x, y, 1e-5), (a, b)),
        (M.MulUniform(relevance=relevance), V.mul2, (a, b)),
        (M.MatmulUE(epsilon=1e-5, relevance=relevance), lambda x, y: V.matmul(x, y, 1e-5), (a, c)),
        (M.IdentityRuleActivation(nn.SiLU(), relevance=relevance), lambda x: V.identity(tF.silu, x), (a,)),
        (M.IdentityRuleActivation(torch.tanh, relevance=relevance), lambda x: V.identity(torch.tanh, x), (a,)),
    ]
    for mod, fn, inputs in pairs:
        start = torch.randn(fn(*inputs).shape, generator=gen, dtype=torch.float64)
        out_m, g_m = _relevance(mod, *inputs, start=start)
        out_f, g_f = _relevance(fn, *inputs, start=start)
        torch.testing.assert_close(out_m, out_f, rtol=0, atol=0)
        for gm, gf in zip(g_m, g_f):
            assert rel_err(gm, gf) == 0.0, type(mod).__name__


def test_add_epsilon_module_n_inputs():
    mod = M.AddEpsilon()
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    out, grads = _relevance(mod, *xs)
    torch.testing.assert_close(out, xs[0] + xs[1] + xs[2])
    # conservative up to O(eps / |z|) per element (eps = 1e-6)
    assert abs(sum(g.sum() for g in grads) - out.sum()) <= 1e-4 * out.abs().sum()
