"""Element-wise rules (lrp_kernels.ops.elementwise, and normalize): epsilon add, uniform mul,
epsilon mean, identity on activations, normalize (identity rule), stop_relevance. Every view
(relevance drop-in, gradient drop-in, the modules ``AddEpsilon`` / ``MulUniform`` /
``IdentityRuleActivation`` in both views) on every backend (torch; no other backend implements
these) against the float64 oracle, and bad input.

``TestElementwise`` runs the common op contract (tests/helpers/contract.py) on this op's cases; the
functions below it are this op's own tests.

Case table, views and tolerances: tests/helpers/cases.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import modules as M

from helpers import oracle as O
from helpers.cases import EPS, OPS, bad, gen_for, rand, rel_err
from helpers.contract import OpContract


# ---- the common op contract on this op's cases (tests/helpers/contract.py) --------------------------

class TestElementwise(OpContract):
    """Runs the common op contract (helpers/contract.py) on NAMES; the functions below are this op's own tests."""
    NAMES = OPS["elementwise"]
    BAD_INPUTS = [  # (call on a view module, exception type, words the message must contain)
        (lambda V: V.add2(bad(2, 3), bad(4, 3)), ValueError, ["broadcast"]),
        (lambda V: V.add(bad(2, 3)), ValueError, ["at least two"]),
        (lambda V: V.add2(bad(2, 3), torch.ones(2, 3, dtype=torch.int32)), TypeError, ["input 1", "floating"]),
        (lambda V: V.add2(bad(2, 3), bad(2, 3, device="meta")), ValueError, ["device"]),
        (lambda V: V.add2(bad(2, 3), bad(2, 3), epsilon=-0.1), ValueError, ["epsilon"]),
        (lambda V: V.mul2(bad(2, 3), bad(3, 2)), ValueError, ["broadcast"]),
        (lambda V: V.mul2(bad(2, 3), torch.ones(2, 3, dtype=torch.bool)), TypeError, ["b", "floating"]),
        (lambda V: V.mul2(bad(2, 3), bad(2, 3, device="meta")), ValueError, ["device"]),
        (lambda V: V.mean(bad(2, 5), 2), ValueError, ["dim"]),
        (lambda V: V.mean(bad(2, 5), (1, -1)), ValueError, ["repeat"]),
        (lambda V: V.mean(bad(2, 5), 1, False, epsilon=-1.0), ValueError, ["epsilon"]),
        (lambda V: V.normalize(bad(2, 5), 2.0, 3), ValueError, ["dim"]),
        (lambda V: V.identity(torch.tanh, bad(2, 5), epsilon=-1.0), ValueError, ["epsilon"]),
        (lambda V: V.identity("tanh", bad(2, 5)), TypeError, ["fn", "callable"]),
        (lambda V: V.identity(lambda t: t.sum(-1), bad(2, 5)), ValueError, ["element-wise"]),
        (lambda V: V.identity(torch.tanh, torch.ones(3, dtype=torch.int64)), TypeError, ["x", "floating"]),
        (lambda V: V.stop_relevance(torch.ones(3, dtype=torch.int64)), TypeError, ["x", "floating"]),
    ]


# ---- the modules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("relevance", [True, False])
def test_wrapper_modules_match_oracle(relevance):
    """AddEpsilon, MulUniform, IdentityRuleActivation (an nn.Module and a function), broadcast
    and non-contiguous operands, against the oracle in their view."""
    gen = gen_for("wrappers", relevance)
    a = rand(gen, (2, 4, 5), torch.float64, "transposed")
    b = rand(gen, (4, 5), torch.float64)

    def identity_R(i, R):  # the identity rule: R_x = R_y
        return [O.d(R)]
    cases = [  # (module, inputs, plain forward, oracle R, oracle G)
        (M.AddEpsilon(epsilon=1e-5, relevance=relevance), (a, b), lambda x, y: x + y,
         lambda i, R: O.add_R(i, R, 1e-5), lambda i, G_: O.add_G(i, G_, 1e-5)),
        (M.MulUniform(relevance=relevance), (a, b), lambda x, y: x * y,
         lambda i, R: list(O.mul_R(*i, R)), lambda i, G_: list(O.mul_G(*i, G_))),
        (M.IdentityRuleActivation(nn.SiLU(), relevance=relevance), (a,), tF.silu,
         identity_R, lambda i, G_: [O.identity_G(tF.silu, i[0], G_, EPS)]),
        (M.IdentityRuleActivation(torch.tanh, relevance=relevance), (a,), torch.tanh,
         identity_R, lambda i, G_: [O.identity_G(torch.tanh, i[0], G_, EPS)]),
    ]
    for mod, inputs, plain, want_R, want_G in cases:
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        out = mod(*xs)
        torch.testing.assert_close(out, plain(*inputs), rtol=0, atol=0)
        start = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(start)
        want = (want_R if relevance else want_G)(inputs, start)
        for x, w in zip(xs, want):
            assert rel_err(x.grad, w) <= 1e-10, type(mod).__name__


def test_add_epsilon_module_n_inputs():
    mod = M.AddEpsilon()
    xs = [torch.randn(3, 4, dtype=torch.float64).requires_grad_() for _ in range(3)]
    out = mod(*xs)
    out.backward(out.detach())
    grads = [x.grad for x in xs]
    torch.testing.assert_close(out, xs[0] + xs[1] + xs[2])
    # conservative up to O(eps / |z|) per element (eps = 1e-6)
    assert abs(sum(g.sum() for g in grads) - out.sum()) <= 1e-4 * out.abs().sum()
    for g, w in zip(grads, O.add_R(xs, out.detach(), mod.epsilon)):
        assert rel_err(g, w) <= 1e-10


# ---- stop_relevance ----------------------------------------------------------------------------

@pytest.mark.parametrize("view", [F, G])
def test_stop_relevance(view):
    gen = gen_for("stop")
    x = rand(gen, (3, 5), torch.float64, "transposed")
    y = view.stop_relevance(x)
    assert torch.equal(y, x) and not y.requires_grad
    z = view.add2(y, x)      # only the second operand receives relevance
    z.backward(torch.ones_like(z))
    assert x.grad is not None
    ra, rb = (O.add_R if view is F else O.add_G)([y, x], torch.ones_like(z), EPS)
    torch.testing.assert_close(x.grad, rb)


# ---- mean: torch's shape rules -----------------------------------------------------------------

@pytest.mark.parametrize("view", [F, G], ids=["R", "G"])
def test_mean_scalar_and_empty_dims_follow_torch(view):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for dim, keepdim in ((None, True), ((), False), ((), True)):
        out = view.mean(x, dim, keepdim)
        assert out.shape == x.mean(dim=dim, keepdim=keepdim).shape
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    out = view.mean(s, 0)
    assert out.shape == s.mean(0).shape
    out.backward(torch.ones_like(out))
    assert torch.isfinite(s.grad)


def test_positional_flags_never_become_an_epsilon():
    """LXT's third positional argument of add2 / matmul is ``inplace``: ours are keyword-only, so
    ``add2(a, b, True)`` is a TypeError, never an epsilon of 1.0."""
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)
    for view in (F, G):
        for call in (lambda: view.add2(a, b, True), lambda: view.matmul(a, b.T, True),
                     lambda: view.mean(a, -1, False, 0.1), lambda: view.identity(torch.tanh, a, 0.1),
                     lambda: view.layer_norm(a, None, None, 1e-5, 0.1)):
            with pytest.raises(TypeError, match="positional"):
                call()


def test_normalize_defaults_equal_torch():
    """``normalize(x)`` is ``F.normalize(x)`` (``p=2, dim=1``) in both views."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for view in (F, G):
        assert torch.equal(view.normalize(x), torch.nn.functional.normalize(x))
