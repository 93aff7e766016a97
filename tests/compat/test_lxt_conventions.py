"""lrp_kernels.compat.lxt's own translations of LXT's conventions, each against its formula
written out here in float64 (LXT's suite, tests/compat/test_lxt_suite.py, does not reach them)."""
import pytest
import torch

import lrp_kernels.compat.lxt.explicit.functional as lf
import lrp_kernels.compat.lxt.explicit.rules as rules


def _grads(out, inputs, seed):
    return torch.autograd.grad(out, inputs, seed, allow_unused=True)


def test_lxt_stabiliser_where_outputs_are_negative():
    # LXT divides by z + eps whatever the sign; with a large eps the difference to ours is visible
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    eps = 0.5
    z = x.detach() @ w.T + b
    r = torch.randn(6, 4, dtype=torch.float64)
    want = x.detach() * ((r / (z + eps)) @ w)
    got, = _grads(lf.linear_epsilon(x, w, b, eps), x, r)
    assert (z < 0).any()
    torch.testing.assert_close(got, want)


def test_matmul_with_a_constant_operand_halves_the_relevance():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64)   # a constant
    r = torch.randn(3, 2, dtype=torch.float64)
    eps = 1e-3
    want = a.detach() * ((r / (2 * (a.detach() @ b) + eps)) @ b.T)
    got, = _grads(lf.matmul(a, b, False, eps), a, r)
    torch.testing.assert_close(got, want)


def test_mean_and_add2_follow_lxt():
    x = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, dtype=torch.float64)
    eps = 0.1
    got, = _grads(lf.mean(x, -1, False, eps), x, r)
    torch.testing.assert_close(got, x.detach() * r[:, None] / (x.detach().sum(-1, keepdim=True) + eps))
    r2 = torch.randn(2, 7, dtype=torch.float64)
    ga, gb = _grads(lf.add2(x, y, False, eps), (x, y), r2)
    torch.testing.assert_close(ga, x.detach() * r2 / (x.detach() + y.detach() + eps))
    torch.testing.assert_close(gb, y.detach() * r2 / (x.detach() + y.detach() + eps))


@pytest.mark.parametrize("call", [lambda a, b: lf.add2(a, b, 1e-3), lambda a, b: lf.matmul(a, b.T, 0.1),
                                  lambda a, b: lf.softmax(a, -1, None, False)])
def test_a_number_where_lxt_has_a_flag_is_refused(call):
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(TypeError):
        call(a, b)


def test_normalize_defaults_as_F_normalize():
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(lf.normalize(x), torch.nn.functional.normalize(x))


def test_rules_wrap_functions_and_uniform_counts_every_tensor():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64)   # constant: LXT still gives it a share
    r = torch.randn(3, 4, dtype=torch.float64)
    got, = _grads(rules.UniformRule(torch.mul)(a, c), a, r)
    torch.testing.assert_close(got, r / 2)
    got, = _grads(rules.IdentityRule(torch.tanh)(a), a, r)
    torch.testing.assert_close(got, r)


def test_taylor_rule_takes_the_jacobian_at_the_reference():
    # f(x) = x^3 on one element: LXT's rule is x * J(ref) * R / (J(ref) x) = R (bias=False),
    # with J at ref = 1: 3; at the input it would also be R, so use two inputs to tell them apart
    x = torch.tensor([[0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0]], dtype=torch.float64)

    def f(t):
        return (t ** 3).sum(-1, keepdim=True)

    got, = _grads(rules.TaylorDecompositionRule(f, ref=(ref,))(x), x, r)
    jac = 3 * ref ** 2                                   # the Jacobian at the reference
    want = x.detach() * jac * r / (jac * x.detach()).sum()
    torch.testing.assert_close(got, want)
    at_input = x.detach() * 3 * x.detach() ** 2 * r / (3 * x.detach() ** 3).sum()
    assert not torch.allclose(got, at_input)
