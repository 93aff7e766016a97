"""The gated product's backward as a kernel op (``gated_product_backward``): the C++ kernel
(SiLU / tanh-GELU recomputed in-register) and the torch path, with and without the epsilon
rescale of the two producing linears (``producer_epsilon``), against the float64 formula of
csrc/gated.h written out here from SPEC's rules:

    s = act(g), h = G_m * k (k = 1/2 when both inputs get a gradient)
    G_u = h * s * u / stab_p(u)          G_g = h * u * s / stab(g) * g / stab_p(g)

with ``stab_p`` the producers' stabiliser (``z / stab_p(z) = 1`` without producers). And the
composition it replaces: ``linear_epsilon`` on gate and up, then ``gated_product``, equals plain
linears followed by ``gated_product(producer_epsilon=eps)``.

Tolerances (norm-wise relative): float32 1e-6 (a ~2 ulp exp, one division per output); bfloat16 /
float16 one rounding of the stored result plus the rounding of the inputs' products (1e-2).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, settings, strategies as st

from helpers import oracle
from helpers.cpp import extension_or_skip, rel
from lrp_kernels.backends import dispatch
from lrp_kernels.ops import grad
from lrp_kernels.ops.elementwise import activation_kind, gated_product

EPS = 1e-6
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ACTS = {"silu": tF.silu, "gelu_tanh": torch.nn.GELU(approximate="tanh")}


def expected(grad_m, g, u, act, need_g, need_u, producer_epsilon):
    """The float64 formula of the module docstring."""
    gm, g, u = (t.double() for t in (grad_m, g, u))
    k = 0.5 if (need_g and need_u) else 1.0
    s = act(g)
    fu = u / oracle.stab(u, producer_epsilon) if producer_epsilon else 1.0
    fg = g / oracle.stab(g, producer_epsilon) if producer_epsilon else 1.0
    return (gm * k * u * s / oracle.stab(g, EPS) * fg if need_g else None), (gm * k * s * fu if need_u else None)


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gm, g, u = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    flat = g.view(-1)
    flat[::17] = 0.0                          # stab(0) = +eps
    flat[1::19] *= 1e-7                        # within a few eps of zero
    flat[2::23] = 95.0 * torch.sign(flat[2::23])  # beyond the exp's clamp: act = x or 0
    u.view(-1)[3::29] = 0.0                    # the producer factor is 0 there
    return gm.to(dtype), g.to(dtype), u.to(dtype)


@pytest.mark.parametrize("kind", sorted(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("producer_epsilon", [0.0, EPS, 0.25])
def test_cpp_kernel_matches_float64_formula(kind, dtype, need, producer_epsilon):
    extension_or_skip()
    act = ACTS[kind]
    gm, g, u = _inputs((3, 37, 29), dtype, seed=hash((kind, need)) % 2**31)
    gg, gu = dispatch.call("gated_product_backward", gm, g, u, act, EPS, *need, producer_epsilon, kind,
                           backend="cpp")
    want_g, want_u = expected(gm, g, u, act, *need, producer_epsilon)
    for got, want in ((gg, want_g), (gu, want_u)):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == g.shape and torch.isfinite(got).all()
        assert rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("producer_epsilon", [0.0, EPS])
def test_torch_path_matches_float64_formula(producer_epsilon):
    gm, g, u = _inputs((4, 33), torch.float64, seed=5)
    gg, gu = dispatch.call("gated_product_backward", gm, g, u, tF.silu, EPS, True, True, producer_epsilon,
                           backend="torch")
    want_g, want_u = expected(gm, g, u, tF.silu, True, True, producer_epsilon)
    assert rel(gg, want_g) <= 1e-12 and rel(gu, want_u) <= 1e-12


def test_cpp_kernel_propagates_nan_and_takes_strided_inputs():
    extension_or_skip()
    gm, g, u = _inputs((8, 40), torch.float32, seed=7)
    g[2, 3] = float("nan")
    gg, gu = dispatch.call("gated_product_backward", gm.t(), g.t(), u.t(), tF.silu, EPS, True, True, EPS, "silu",
                           backend="cpp")
    assert torch.isnan(gg[3, 2]) and torch.isnan(gu[3, 2])  # NaN in, NaN out: never hidden
    finite = ~torch.isnan(g.t())
    want_g, want_u = expected(gm.t(), g.t(), u.t(), tF.silu, True, True, EPS)
    assert rel(gg[finite], want_g[finite]) <= 1e-6 and rel(gu[finite], want_u[finite]) <= 1e-6


def test_cpp_declines_what_it_cannot_compute():
    extension_or_skip()
    gm, g, u = _inputs((4, 9), torch.float32, seed=8)
    cases = {"unknown activation": (gm, g, u, torch.tanh, EPS, True, True, 0.0, None),
             "float64": (gm.double(), g.double(), u.double(), tF.silu, EPS, True, True, 0.0, "silu"),
             "broadcast": (gm, g[:1], u, tF.silu, EPS, True, True, 0.0, "silu"),
             "epsilon 0": (gm, g, u, tF.silu, 0.0, True, True, 0.0, "silu")}
    for name, args in cases.items():
        assert dispatch.chosen_backend("gated_product_backward", *args) == "torch", name
        # a variant the kernel does not cover: forcing cpp runs the torch path, no error
        assert dispatch.chosen_backend("gated_product_backward", *args, backend="cpp") == "torch", name
    with pytest.raises(dispatch.BackendUnavailableError, match="CPU only"):  # what it cannot run: an error
        meta = [t.to("meta") for t in (gm, g, u)]
        dispatch.chosen_backend("gated_product_backward", *meta, tF.silu, EPS, True, True, 0.0, "silu", backend="cpp")
    assert dispatch.chosen_backend("gated_product_backward", gm, g, u, tF.silu, EPS, True, True, 0.0, "silu") == "cpp"


def test_activation_kind_knows_the_formulas_it_names():
    from transformers.activations import ACT2FN

    assert activation_kind(tF.silu) == "silu"
    assert activation_kind(torch.nn.SiLU().forward) == "silu"
    assert activation_kind(ACT2FN["silu"].forward) == "silu"
    assert activation_kind(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    for name in ("gelu_pytorch_tanh", "gelu_new"):
        assert activation_kind(ACT2FN[name].forward) == "gelu_tanh", name
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    for name in ("silu", "gelu_pytorch_tanh", "gelu_new"):  # the names stand for these formulas
        kind = activation_kind(ACT2FN[name].forward)
        assert torch.allclose(ACT2FN[name](x), ACTS[kind](x), rtol=0, atol=1e-12), name
    assert activation_kind(torch.nn.GELU()) is None  # erf GELU: torch path
    assert activation_kind(ACT2FN["gelu"].forward) is None
    assert activation_kind(torch.tanh) is None

    class SiLU(torch.nn.Module):  # a user's look-alike is not trusted by name
        def forward(self, x):
            return x * 2
    assert activation_kind(SiLU().forward) is None


def test_producer_epsilon_is_checked():
    g = torch.randn(3, 4)
    for bad in (-1.0, float("nan"), float("inf"), True, "1e-6"):
        with pytest.raises(ValueError, match="producer_epsilon"):
            gated_product(g, g, tF.silu, producer_epsilon=bad)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), hidden=st.integers(1, 12), inter=st.integers(1, 40),
       kind=st.sampled_from(sorted(ACTS)), backend=st.sampled_from(["torch", "cpp"]),
       seed=st.integers(0, 2**31 - 1), log_eps=st.floats(-7, -1))
def test_folded_producers_equal_epsilon_linears_then_product(rows, hidden, inter, kind, backend, seed, log_eps):
    """What the patch folds: plain gate / up linears + ``producer_epsilon`` == the two epsilon
    linears followed by the product rule (float32, any shape, both backends)."""
    if backend == "cpp":
        extension_or_skip()
    eps = 10.0 ** log_eps
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    Wg, Wu = (torch.randn(inter, hidden, generator=gen) / math.sqrt(hidden) for _ in range(2))
    gm = torch.randn(rows, inter, generator=gen)
    act = ACTS[kind]

    x1 = x.clone().requires_grad_(True)
    gated_product(grad.linear_epsilon(x1, Wg, None, eps, backend=backend, share_output=True),
                  grad.linear_epsilon(x1, Wu, None, eps, backend=backend, share_output=True),
                  act, eps, backend=backend).backward(gm)
    x2 = x.clone().requires_grad_(True)
    gated_product(tF.linear(x2, Wg), tF.linear(x2, Wu), act, eps, backend=backend,
                  producer_epsilon=eps).backward(gm)
    assert rel(x2.grad, x1.grad) <= 1e-5
