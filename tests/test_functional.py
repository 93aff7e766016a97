"""Relevance view (lrp_kernels.functional) against the float64 oracle (tests/oracle.py).

Every drop-in, on fresh random inputs (a seed per test, no stored outputs), batched, odd sizes,
contiguous / transposed / strided-slice layouts, in three dtypes:

* float64: the exact formula, with an *arbitrary* random output relevance, tol 1e-10;
* float32: tol 1e-5 relative (norm-wise), SPEC's promise;
* bfloat16: tol 2e-2 relative, against the oracle evaluated on the bf16-rounded inputs
  (the kernels compute in fp32 but the forward output ``z`` the rule divides by is bf16).

In fp32/bf16 the output relevance is ``R_out = out * G`` for random ``G``: that is what an
upstream rule delivers (relevance proportional to the activation), and it keeps
``R_z / stab(z)`` well-conditioned. With an arbitrary ``R_z`` a ``z`` that is ~0 only up to
rounding makes the *reference itself* ill-conditioned, not the kernel wrong.

The case table (``CASES``) is shared with tests/test_grad_view.py (gradient view).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as tF

import lrp_kernels
import lrp_kernels.functional as F
import lrp_kernels.grad as G
from helpers import oracle as O

EPS = 1e-6
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["contig", "transposed", "sliced"]
# where the case table puts its tensors (values are always drawn on the CPU, so a CUDA run of a
# case sees the same numbers as the CPU run; see tests/test_grad_view.py's GPU tests)
DEVICE = ["cpu"]
# the reference backend, and whatever "auto" picks here (cpp where built; never the interpreter)
BACKENDS = ["torch", "auto"]


# ---- helpers -----------------------------------------------------------------------------------

def gen_for(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def cast(t, dtype):
    return t.to(dtype=dtype, device=DEVICE[0])


def rand(gen, shape, dtype, layout="contig", grad=True, scale=1.0) -> torch.Tensor:
    """Random tensor with the requested memory layout (values drawn in fp32, then cast)."""
    shape = tuple(shape)

    def draw(*s):
        return (torch.randn(*s, generator=gen) * scale).to(dtype=dtype, device=DEVICE[0])
    if layout == "transposed" and len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1:
        t = draw(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    elif layout in ("transposed", "sliced") and len(shape) >= 1 and shape[-1] > 1:
        t = draw(*shape[:-1], 2 * shape[-1])[..., ::2]
    else:
        t = draw(*shape)
    if layout != "contig" and shape[-1] > 1:
        assert not t.is_contiguous()
    return t.requires_grad_(grad)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite relevance"
    den = want.norm()
    return ((got - want).norm() / den).item() if den > 0 else (got - want).norm().item()


def _to(t, like):
    return None if t is None else t.to(like.dtype)


def leaf_grads(inputs):
    return [t.grad if t.requires_grad else None for t in inputs]


# ---- the case table ----------------------------------------------------------------------------

@dataclass
class Case:
    inputs: list                       # leaves (those with requires_grad get relevance)
    run: Callable                      # (view_module, *inputs) -> output
    plain: Callable                    # (*inputs) -> output of the plain torch op
    oracle_R: Callable                 # (inputs, R_out) -> expected R per input (None: none)
    oracle_G: Callable                 # (inputs, G_out) -> expected G per input
    conservative: bool = True          # SPEC promises sum(R_in) == sum(R_out) (eps -> 0)


def _linear(bias, x_shape=(2, 3, 13), n=7):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, x_shape, dtype, layout)
        w = rand(gen, (n, x_shape[-1]), dtype, layout, grad=False, scale=0.3)
        b = rand(gen, (n,), dtype, grad=False) if bias == "rand" else \
            (torch.zeros(n, dtype=dtype, device=DEVICE[0]) if bias == "zero" else None)
        return Case([x], lambda V, x: V.linear_epsilon(x, w, b, eps), lambda x: tF.linear(x, w.to(x.dtype), _to(b, x)),
                    lambda i, R: [O.linear_epsilon_R(i[0], w, b, R, eps)],
                    lambda i, G_: [O.linear_epsilon_G(i[0], w, b, G_, eps)],
                    conservative=bias != "rand")
    return build


def _add(*shapes):
    def build(gen, dtype, layout, eps=EPS):
        ts = [rand(gen, s, dtype, layout if len(s) > 1 else "contig") for s in shapes]
        run = (lambda V, a, b: V.add2(a, b, eps)) if len(ts) == 2 else (lambda V, *t: V.add(*t, epsilon=eps))
        plain = lambda *t: sum(t[1:], t[0])  # noqa: E731
        return Case(ts, run, plain, lambda i, R: O.add_R(i, R, eps), lambda i, G_: O.add_G(i, G_, eps))
    return build


def _mul(sa, sb, b_const=False):
    def build(gen, dtype, layout, eps=EPS):
        a = rand(gen, sa, dtype, layout)
        b = rand(gen, sb, dtype, layout, grad=not b_const)
        return Case([a, b], lambda V, a, b: V.mul2(a, b), lambda a, b: a * b,
                    lambda i, R: list(O.mul_R(*i, R, b_const=b_const)),
                    lambda i, G_: list(O.mul_G(*i, G_, b_const=b_const)))
    return build


def _matmul(sa, sb, b_const=False):
    share = 1.0 if b_const else 2.0

    def build(gen, dtype, layout, eps=EPS):
        a = rand(gen, sa, dtype, layout)
        b = rand(gen, sb, dtype, layout, grad=not b_const)

        def drop(pair):
            return [pair[0], None if b_const else pair[1]]
        return Case([a, b], lambda V, a, b: V.matmul(a, b, eps), torch.matmul,
                    lambda i, R: drop(O.matmul_any_R(*i, R, eps, share)),
                    lambda i, G_: drop(O.matmul_any_G(*i, G_, eps, share)))
    return build


def _softmax(shape, dim, temperature=1.0, out_dtype=None):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, shape, dtype, layout, scale=2.0)
        return Case([x], lambda V, x: V.softmax(x, dim, out_dtype, temperature),
                    lambda x: torch.softmax(x / temperature, dim, dtype=out_dtype),
                    lambda i, R: [O.softmax_R(i[0], R, dim, temperature)],
                    lambda i, G_: [O.softmax_G(i[0], G_, dim, temperature)], conservative=False)
    return build


def _rms(with_weight):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, (2, 3, 13), dtype, layout)
        w = cast(torch.rand(13, generator=gen) + 0.5, dtype) if with_weight else None
        return Case([x], lambda V, x: V.rms_norm_identity(x, w, 1e-6),
                    lambda x: tF.rms_norm(x, (13,), _to(w, x), 1e-6),
                    lambda i, R: [O.d(R)], lambda i, G_: [O.rms_norm_G(i[0], w, G_, 1e-6)])
    return build


def _layer_norm(with_weight, with_bias):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, (2, 3, 13), dtype, layout)
        w = cast(torch.rand(13, generator=gen) + 0.5, dtype) if with_weight else None
        b = cast(torch.randn(13, generator=gen), dtype) if with_bias else None
        return Case([x], lambda V, x: V.layer_norm(x, w, b, 1e-5, eps),
                    lambda x: tF.layer_norm(x, (13,), _to(w, x), _to(b, x), 1e-5),
                    lambda i, R: [O.layer_norm_R(i[0], w, b, R, 1e-5, eps)],
                    lambda i, G_: [O.layer_norm_G(i[0], w, G_, 1e-5)], conservative=not with_bias)
    return build


def _mean(dim, keepdim):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, (2, 3, 5, 7), dtype, layout)
        # offset so that the means are not ~0 (mean of ~zero-mean noise is ill-conditioned in fp32)
        with torch.no_grad():
            x += 1.5
        plain = (lambda x: x.mean(dim=dim, keepdim=keepdim))
        dims = (dim,) if isinstance(dim, int) else dim
        return Case([x], lambda V, x: V.mean(x, dim, keepdim, eps), plain,
                    lambda i, R: [O.mean_dims_R(i[0], dims, R, eps, keepdim)],
                    lambda i, G_: [O.mean_dims_G(i[0], dims, G_, eps, keepdim)])
    return build


def _normalize(p, dim):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, (3, 5, 7), dtype, layout)
        return Case([x], lambda V, x: V.normalize(x, p, dim), lambda x: tF.normalize(x, p, dim),
                    lambda i, R: [O.d(R)], lambda i, G_: [O.normalize_G(i[0], G_, p, dim, 1e-12)])
    return build


def _identity(fn):
    def build(gen, dtype, layout, eps=EPS):
        x = rand(gen, (2, 5, 9), dtype, layout)
        return Case([x], lambda V, x: V.identity(fn, x, eps), fn,
                    lambda i, R: [O.d(R)], lambda i, G_: [O.identity_G(fn, i[0], G_, eps)])
    return build


CASES = {
    "linear_bias": _linear("rand"),
    "linear_nobias": _linear(None),
    "linear_zerobias": _linear("zero"),
    "linear_1d_input": _linear(None, x_shape=(13,)),
    "add2_same": _add((2, 5, 7), (2, 5, 7)),
    "add2_broadcast": _add((2, 5, 7), (5, 7)),
    "add3_broadcast": _add((2, 5, 7), (7,), (2, 5, 1)),
    "mul2": _mul((3, 5, 7), (3, 5, 7)),
    "mul2_broadcast": _mul((3, 5, 7), (5, 1)),
    "mul2_const": _mul((3, 5, 7), (3, 5, 7), b_const=True),
    "matmul_2d": _matmul((5, 7), (7, 3)),
    "matmul_batched": _matmul((2, 3, 5, 7), (2, 3, 7, 4)),
    "matmul_bcast_batch": _matmul((2, 1, 5, 7), (3, 7, 4)),
    "matmul_bcast_2d": _matmul((3, 5, 7), (7, 4)),
    "matmul_1d_left": _matmul((7,), (2, 7, 4)),
    "matmul_1d_right": _matmul((2, 5, 7), (7,)),
    "matmul_1d_1d": _matmul((7,), (7,)),
    "matmul_const": _matmul((2, 5, 7), (7, 4), b_const=True),
    "softmax_last": _softmax((2, 3, 11), -1),
    "softmax_dim1": _softmax((2, 5, 7), 1),
    "softmax_dim0_T": _softmax((5, 3, 4), 0, temperature=0.7),
    "softmax_dtype_f32": _softmax((3, 9), -1, out_dtype=torch.float32),
    "rms_weight": _rms(True),
    "rms_noweight": _rms(False),
    "layer_norm_wb": _layer_norm(True, True),
    "layer_norm_w": _layer_norm(True, False),
    "layer_norm_plain": _layer_norm(False, False),
    "mean_dim1": _mean(1, False),
    "mean_dims_keep": _mean((-1, 1), True),
    "mean_all": _mean(None, False),
    "mean_all_keep": _mean(None, True),
    "normalize_l2": _normalize(2.0, -1),
    "normalize_l1_dim1": _normalize(1.0, 1),
    "identity_silu": _identity(tF.silu),
    "identity_gelu": _identity(tF.gelu),
    "identity_tanh": _identity(torch.tanh),
}


def run_case(name, dtype, layout, view, seed_extra=""):
    """Build a case, run forward + backward in ``view``; returns (case, out, grads, start)."""
    gen = gen_for(name, str(dtype), layout, view, seed_extra)
    case = CASES[name](gen, dtype, layout)
    out = case.run(F if view == "R" else G, *case.inputs)
    g = torch.randn(out.shape, generator=gen).to(dtype=out.dtype, device=out.device)
    if view == "R" and dtype != torch.float64:
        start = torch.nan_to_num(out.detach() * g)  # relevance proportional to the activation
    else:
        start = g
    out.backward(start)
    if view == "R" and dtype != torch.float64:
        # the oracle's relevance is proportional to *its* (float64) activation, with the same G
        start = case.plain(*[t.detach().double() for t in case.inputs]).double() * g.double()
    return case, out, leaf_grads(case.inputs), start


# ---- relevance view vs oracle ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_relevance_matches_oracle(name, dtype, layout, backend):
    with lrp_kernels.use_backend(backend):
        case, out, grads, start = run_case(name, dtype, layout, "R")
    want = case.oracle_R(case.inputs, start)
    for i, (g, w) in enumerate(zip(grads, want)):
        if w is None:
            assert g is None, f"input {i} is a constant and must get no relevance"
            continue
        assert g is not None, f"input {i} got no relevance"
        assert g.dtype == case.inputs[i].dtype and g.shape == case.inputs[i].shape
        err = rel_err(g, w)
        tol = max(TOL[dtype], TOL[out.dtype])  # softmax(dtype=...) may compute in a lower precision
        assert err <= tol, f"{name} {dtype} {layout} input {i}: rel err {err:.3g} > {tol}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_equals_plain_op(name, dtype):
    gen = gen_for("fwd", name, str(dtype))
    case = CASES[name](gen, dtype, "transposed")
    for view in (F, G):
        out = case.run(view, *case.inputs)
        ref = case.plain(*case.inputs)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, equal_nan=True)


CONSERVATIVE = [n for n in CASES if CASES[n](gen_for(n), torch.float64, "contig").conservative]


@pytest.mark.parametrize("view", ["R", "G"])
@pytest.mark.parametrize("name", CONSERVATIVE)
def test_conservation_eps_to_zero(name, view):
    """SPEC: epsilon / identity / uniform rules with eps -> 0 and zero bias conserve relevance,
    sum(R_in) == sum(R_out), in both views (gradient view: R_t = t * t.grad)."""
    gen = gen_for("cons", name, view)
    case = CASES[name](gen, torch.float64, "contig", eps=1e-12)
    out = case.run(F if view == "R" else G, *case.inputs)
    start = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    out.backward(start)
    r_out = start if view == "R" else out.detach() * start
    r_in = [t.grad if view == "R" else t.detach() * t.grad for t in case.inputs if t.requires_grad]
    total_in = sum(r.sum() for r in r_in)
    assert abs(total_in - r_out.sum()) <= 1e-8 * r_out.abs().sum(), (total_in, r_out.sum())


@pytest.mark.parametrize("name", ["linear_bias", "layer_norm_wb"])
def test_bias_absorbs_relevance(name):
    """With a bias the epsilon rule is not conservative: the bias keeps ``b * R_z / z``."""
    gen = gen_for("absorb", name)
    case = CASES[name](gen, torch.float64, "contig", eps=1e-12)
    out = case.run(F, *case.inputs)
    start = out.detach().clone()  # R_z = z: the bias's share is sum(b * R_z / z) = n_rows * sum(b)
    out.backward(start)
    lost = (start.sum() - case.inputs[0].grad.sum()).abs()
    assert lost > 1e-3 * start.abs().sum()


def test_softmax_dt_is_not_conservative():
    """The rule 'with bias' absorbs relevance: with R_s = s each row's relevance sums to 0."""
    gen = gen_for("sm-absorb")
    x = rand(gen, (4, 9), torch.float64)
    s = F.softmax(x, -1)
    s.backward(s.detach())
    torch.testing.assert_close(x.grad.sum(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert s.detach().sum() > 3.9  # while 4 units of relevance came in


# ---- softmax masks ------------------------------------------------------------------------------

def _masked_logits(gen, dtype, fill):
    """Rows: unmasked, partly masked, fully masked (by ``fill``: -inf or the dtype minimum)."""
    x = (torch.randn(3, 4, 9, generator=gen) * 2).to(dtype)
    mask = torch.rand(3, 4, 9, generator=gen) < 0.4
    mask[:, 0] = False        # an unmasked row per batch
    mask[1, 2] = True         # a fully masked row
    mask[2, 3, :-1] = True    # only one entry left
    value = float("-inf") if fill == "-inf" else torch.finfo(dtype).min
    return x.masked_fill(mask, value).requires_grad_(), mask


@pytest.mark.parametrize("view", ["R", "G"])
@pytest.mark.parametrize("fill", ["-inf", "min"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_masked_logits(dtype, fill, view):
    gen = gen_for("mask", str(dtype), fill, view)
    x, mask = _masked_logits(gen, dtype, fill)
    s = (F if view == "R" else G).softmax(x, -1)
    torch.testing.assert_close(s, torch.softmax(x, -1), equal_nan=True)
    # upstream relevance / gradient, finite everywhere (also on the fully masked rows). In the
    # relevance view it is s * G as any upstream rule delivers it: zero where s == 0 (what
    # relevance "at" a zero-probability entry should do is not defined by SPEC; the oracle
    # ignores it, the kernel treats it as the limit s -> 0)
    start = torch.randn(s.shape, generator=gen).to(dtype)
    if view == "R":
        start = torch.nan_to_num(s.detach() * start, nan=0.0)
    s.backward(start)
    gx = x.grad
    assert torch.isfinite(gx).all(), "NaN/Inf relevance from masked logits"
    assert (gx[mask] == 0).all(), "masked logits must carry exactly zero relevance"
    assert (gx[1, 2] == 0).all(), "a fully masked row carries zero relevance"
    keep = ~mask.all(-1)
    want = (O.softmax_R if view == "R" else O.softmax_G)(x, start, -1)
    err = rel_err(gx[keep], want[keep])
    assert err <= TOL[dtype], f"rel err {err:.3g}"


def test_softmax_fully_masked_row_nan_upstream():
    """A fully -inf row makes softmax NaN (as torch); its NaN relevance becomes 0, others intact."""
    x = torch.randn(3, 5, dtype=torch.float64)
    x[1] = float("-inf")
    x.requires_grad_()
    s = F.softmax(x, -1)
    assert torch.isnan(s[1]).all() and torch.isfinite(s[[0, 2]]).all()
    s.backward(torch.nan_to_num(s.detach(), nan=0.0))
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[[0, 2]], O.softmax_R(x[[0, 2]], s.detach()[[0, 2]]))


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


def test_linear_weight_and_bias_get_no_relevance():
    gen = gen_for("wgrad")
    x = rand(gen, (4, 6), torch.float64)
    w = rand(gen, (3, 6), torch.float64)
    b = rand(gen, (3,), torch.float64)
    F.linear_epsilon(x, w, b).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


def test_recompute_gives_the_same_relevance():
    gen = gen_for("recompute")
    x = rand(gen, (2, 5, 9), torch.float32, "transposed")
    w = rand(gen, (4, 9), torch.float32, grad=False)
    b = rand(gen, (4,), torch.float32, grad=False)
    grads = []
    for recompute in (False, True):
        y = F.linear_epsilon(x, w, b, recompute=recompute)
        y.backward(y.detach())
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


# ---- bad input: clear errors -------------------------------------------------------------------

def _f(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype) if device == "cpu" else torch.empty(*shape, dtype=dtype, device=device)


BAD_INPUTS = [
    # (call, exception type, words the message must contain)
    (lambda V: V.linear_epsilon(_f(2, 5), _f(3, 4)), ValueError, ["in_features", "x"]),
    (lambda V: V.linear_epsilon(_f(2, 4), _f(3, 4), _f(4)), ValueError, ["bias", "(3,)"]),
    (lambda V: V.linear_epsilon(_f(2, 4), _f(3, 4, 1)), ValueError, ["weight", "2-D"]),
    (lambda V: V.linear_epsilon(torch.ones(2, 4, dtype=torch.int64), _f(3, 4)), TypeError, ["x", "floating"]),
    (lambda V: V.linear_epsilon(_f(2, 4), _f(3, 4, device="meta")), ValueError, ["device", "weight"]),
    (lambda V: V.linear_epsilon(_f(2, 4), _f(3, 4), None, -1e-3), ValueError, ["epsilon"]),
    (lambda V: V.add2(_f(2, 3), _f(4, 3)), ValueError, ["broadcast"]),
    (lambda V: V.add(_f(2, 3)), ValueError, ["at least two"]),
    (lambda V: V.add2(_f(2, 3), torch.ones(2, 3, dtype=torch.int32)), TypeError, ["input 1", "floating"]),
    (lambda V: V.add2(_f(2, 3), _f(2, 3, device="meta")), ValueError, ["device"]),
    (lambda V: V.add2(_f(2, 3), _f(2, 3), -0.1), ValueError, ["epsilon"]),
    (lambda V: V.mul2(_f(2, 3), _f(3, 2)), ValueError, ["broadcast"]),
    (lambda V: V.mul2(_f(2, 3), torch.ones(2, 3, dtype=torch.bool)), TypeError, ["b", "floating"]),
    (lambda V: V.mul2(_f(2, 3), _f(2, 3, device="meta")), ValueError, ["device"]),
    (lambda V: V.matmul(_f(2, 3), _f(4, 5)), ValueError, ["contraction"]),
    (lambda V: V.matmul(_f(2, 3, 4), _f(3, 4, 5)), ValueError, ["batch", "broadcast"]),
    (lambda V: V.matmul(_f(2, 3), torch.tensor(2.0)), ValueError, ["at least 1 dim"]),
    (lambda V: V.matmul(_f(2, 3), _f(3, 2), -1.0), ValueError, ["epsilon"]),
    (lambda V: V.matmul(_f(2, 3), _f(3, 2, device="meta")), ValueError, ["device"]),
    (lambda V: V.softmax(_f(2, 3), 2), ValueError, ["dim"]),
    (lambda V: V.softmax(_f(2, 3), -3), ValueError, ["dim"]),
    (lambda V: V.softmax(_f(2, 3), -1, None, 0.0), ValueError, ["temperature"]),
    (lambda V: V.softmax(torch.ones(2, 3, dtype=torch.int64), -1), TypeError, ["x", "floating"]),
    (lambda V: V.rms_norm_identity(_f(2, 5), _f(4)), ValueError, ["weight", "(5,)"]),
    (lambda V: V.rms_norm_identity(_f(2, 5), _f(5), -1.0), ValueError, ["eps"]),
    (lambda V: V.rms_norm_identity(_f(2, 5), _f(5, device="meta")), ValueError, ["device"]),
    (lambda V: V.layer_norm(_f(2, 5), _f(5), _f(3)), ValueError, ["bias", "(5,)"]),
    (lambda V: V.layer_norm(_f(2, 5), None, None, 1e-5, -1.0), ValueError, ["epsilon"]),
    (lambda V: V.layer_norm(torch.ones(2, 5, dtype=torch.int64)), TypeError, ["x", "floating"]),
    (lambda V: V.mean(_f(2, 5), 2), ValueError, ["dim"]),
    (lambda V: V.mean(_f(2, 5), (1, -1)), ValueError, ["repeat"]),
    (lambda V: V.mean(_f(2, 5), 1, False, -1.0), ValueError, ["epsilon"]),
    (lambda V: V.normalize(_f(2, 5), 2.0, 3), ValueError, ["dim"]),
    (lambda V: V.identity(torch.tanh, _f(2, 5), -1.0), ValueError, ["epsilon"]),
    (lambda V: V.identity("tanh", _f(2, 5)), TypeError, ["fn", "callable"]),
    (lambda V: V.identity(lambda t: t.sum(-1), _f(2, 5)), ValueError, ["element-wise"]),
    (lambda V: V.identity(torch.tanh, torch.ones(3, dtype=torch.int64)), TypeError, ["x", "floating"]),
    (lambda V: V.stop_relevance(torch.ones(3, dtype=torch.int64)), TypeError, ["x", "floating"]),
    (lambda V: V.linear_epsilon(_f(2, 4), _f(3, 4), backend="cuda"), ValueError, ["backend"]),
]


@pytest.mark.parametrize("view", [F, G], ids=["R", "G"])
@pytest.mark.parametrize("idx", range(len(BAD_INPUTS)))
def test_bad_input_raises_clear_error(idx, view):
    call, exc, words = BAD_INPUTS[idx]
    with pytest.raises(exc) as info:
        call(view)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"error message {msg!r} should mention {w!r}"


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


def test_mixed_dtypes_in_gemm_rules_raise():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="weight is torch.float64"):
        F.linear_epsilon(x, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias is torch.bfloat16"):
        G.linear_epsilon(x, torch.randn(3, 4), torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="b is torch.float64"):
        F.matmul(x, torch.randn(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("view", [F, G], ids=["R", "G"])
def test_softmax_nan_logits_are_not_hidden(view):
    """A NaN logit is a bug upstream: its row's relevance must show NaN, not a silent 0."""
    x = torch.randn(3, 5, dtype=torch.float64)
    x[1, 2] = float("nan")
    x[2, :] = float("-inf")  # fully masked: still exactly 0
    x.requires_grad_()
    s = view.softmax(x, -1)
    s.backward(torch.ones_like(s) if view is G else torch.nan_to_num(s.detach(), nan=0.0) + 0.1)
    assert torch.isnan(x.grad[1]).any()
    assert torch.isfinite(x.grad[0]).all() and (x.grad[2] == 0).all()


def test_softmax_ignores_relevance_arriving_at_masked_entries():
    """Masked logits are outside the softmax: R_s there must not leak into the row (SPEC masks)."""
    torch.manual_seed(11)
    x = torch.randn(3, 7, dtype=torch.float64)
    x[:, 2] = float("-inf")
    x[1, 5] = torch.finfo(torch.float64).min
    r = torch.randn(3, 7, dtype=torch.float64)
    r_zeroed = r.clone()
    r_zeroed[:, 2] = 0.0
    r_zeroed[1, 5] = 0.0
    got = []
    for rel in (r, r_zeroed):
        xx = x.clone().requires_grad_()
        F.softmax(xx, -1).backward(rel)
        got.append(xx.grad)
    assert torch.equal(got[0], got[1])
    assert torch.isfinite(got[0]).all() and (got[0][:, 2] == 0).all()
