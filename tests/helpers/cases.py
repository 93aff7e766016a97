"""The per-op case table and the checks every file of ``tests/ops/`` runs on its own cases.

Every drop-in, on fresh random inputs (a seed per test, no stored outputs), batched, odd sizes,
contiguous / transposed / strided-slice layouts, in three dtypes, against the float64 oracle
(:mod:`helpers.oracle`):

* float64: the exact formula, with an *arbitrary* random output relevance, tol 1e-10;
* float32: tol 1e-5 relative (norm-wise), SPEC's promise;
* bfloat16: tol 2e-2 relative, against the oracle evaluated on the bf16-rounded inputs
  (the kernels compute in fp32 but the forward output ``z`` the rule divides by is bf16).

In the relevance view in fp32/bf16 the output relevance is ``R_out = out * G`` for random ``G``:
that is what an upstream rule delivers (relevance proportional to the activation), and it keeps
``R_z / stab(z)`` well-conditioned. With an arbitrary ``R_z`` a ``z`` that is ~0 only up to
rounding makes the *reference itself* ill-conditioned, not the kernel wrong. In the gradient
view the upstream gradient is an arbitrary random ``G`` in every dtype (the rules multiply by
``z / stab(z)``, which is well-conditioned).

Views (``VIEWS``): ``"R"`` the relevance drop-ins (:mod:`lrp_kernels.functional`), ``"G"`` the
gradient drop-ins (:mod:`lrp_kernels.grad`), ``"MR"`` / ``"MG"`` the modules of
:mod:`lrp_kernels.modules` with ``relevance=True`` / ``False`` (:class:`ModuleView` builds
them from the same arguments). Backends: ``"torch"``, ``"auto"`` (the C++ backend for the norms
wherever it is built; never the Triton interpreter) and ``"triton"`` (through the interpreter on
CPU, float32 only) for the ops with a Triton kernel.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import lrp_kernels
import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import modules as M
from lrp_kernels.backends import dispatch

from . import oracle as O

EPS = 1e-6
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["contig", "transposed", "sliced"]
# where the case table puts its tensors (values are always drawn on the CPU, so a CUDA run of a
# case sees the same numbers as the CPU run; see the CUDA tests of the op files)
DEVICE = ["cpu"]
# the reference backend, and whatever "auto" picks here (cpp where built; never the interpreter)
BACKENDS = ["torch", "auto"]
VIEWS = {"R": "relevance drop-ins", "G": "gradient drop-ins", "MR": "modules, relevance=True",
         "MG": "modules, relevance=False"}

TRITON_OK, TRITON_WHY = dispatch.backend_status("triton")


def _triton_on_cpu() -> str | None:
    """None if the case table (CPU tensors) can run on the triton backend, else why not."""
    if not TRITON_OK:
        return f"triton backend unavailable: {TRITON_WHY}"
    from lrp_kernels.backends.triton import interpreting
    if not interpreting():
        return "CPU tensors on the triton backend need TRITON_INTERPRET=1 (the CUDA tests cover the GPU)"
    return None


# the triton backend on the case table: the interpreter, float32 only (its bf16 arithmetic is not
# the GPU's); skipped with the reason where that cannot run
TRITON = pytest.param("triton", marks=pytest.mark.skipif(_triton_on_cpu() is not None,
                                                         reason=str(_triton_on_cpu())))
# (view, layout) on the triton backend: both drop-ins in every layout, the modules in one
TRITON_VIEWS = [(v, layout) for v in ("R", "G") for layout in LAYOUTS] + [("MR", "transposed"), ("MG", "transposed")]


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
    """Norm-wise relative error ||got - want|| / ||want|| (absolute where want is 0); asserts
    equal shapes and a finite ``got`` (an unwritten output or a NaN shows up here)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite element (unwritten output or NaN)"
    den = want.norm()
    return ((got - want).norm() / den).item() if den > 0 else (got - want).norm().item()


def _to(t, like):
    return None if t is None else t.to(like.dtype)


def leaf_grads(inputs):
    return [t.grad if t.requires_grad else None for t in inputs]


# ---- the modules as a view ----------------------------------------------------------------------

def _param(t):
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


class ModuleView:
    """The drop-in modules called like the functional drop-ins: each call builds the module from
    the call's arguments (the case's own weights, layouts kept) and applies it."""

    def __init__(self, relevance: bool):
        self.relevance = relevance

    def linear_epsilon(self, x, weight, bias=None, epsilon=EPS):
        mod = M.LinearEpsilon(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta",
                              epsilon=epsilon, relevance=self.relevance)
        mod.weight, mod.bias = _param(weight), _param(bias)
        return mod(x)

    def add2(self, a, b, epsilon=EPS):
        return M.AddEpsilon(epsilon, relevance=self.relevance)(a, b)

    def add(self, *inputs, epsilon=EPS):
        return M.AddEpsilon(epsilon, relevance=self.relevance)(*inputs)

    def mul2(self, a, b):
        return M.MulUniform(relevance=self.relevance)(a, b)

    def matmul(self, a, b, epsilon=EPS):
        return M.MatmulUE(epsilon, relevance=self.relevance)(a, b)

    def softmax(self, x, dim, dtype=None, temperature=1.0):
        return M.SoftmaxDT(dim, dtype, temperature, relevance=self.relevance)(x)

    def rms_norm_identity(self, x, weight=None, eps=1e-6):
        mod = M.RMSNormIdentity(x.shape[-1], eps, device="meta", relevance=self.relevance)
        mod.weight = _param(torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight)
        return mod(x)

    def layer_norm(self, x, weight=None, bias=None, eps=1e-5, epsilon=EPS):
        mod = M.LayerNormIdentity(x.shape[-1], eps, elementwise_affine=weight is not None, bias=bias is not None,
                                  device="meta", epsilon=epsilon, relevance=self.relevance)
        if weight is not None:
            mod.weight = _param(weight)
        if bias is not None:
            mod.bias = _param(bias)
        return mod(x)

    def identity(self, fn, x, epsilon=EPS):
        return M.IdentityRuleActivation(fn, epsilon, relevance=self.relevance)(x)


VIEW_MODULES = {"R": F, "G": G, "MR": ModuleView(True), "MG": ModuleView(False)}


def is_relevance_view(view: str) -> bool:
    return view in ("R", "MR")


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
        run = (lambda V, a, b: V.add2(a, b, epsilon=eps)) if len(ts) == 2 else (lambda V, *t: V.add(*t, epsilon=eps))
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
        return Case([a, b], lambda V, a, b: V.matmul(a, b, epsilon=eps), torch.matmul,
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
        return Case([x], lambda V, x: V.layer_norm(x, w, b, 1e-5, epsilon=eps),
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
        return Case([x], lambda V, x: V.mean(x, dim, keepdim, epsilon=eps), plain,
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
        return Case([x], lambda V, x: V.identity(fn, x, epsilon=eps), fn,
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

# which op file owns which cases (tests/ops/test_<op>.py), and which have a module / a Triton kernel
OPS = {
    "linear_epsilon": ["linear_bias", "linear_nobias", "linear_zerobias", "linear_1d_input"],
    "elementwise": ["add2_same", "add2_broadcast", "add3_broadcast", "mul2", "mul2_broadcast", "mul2_const",
                    "mean_dim1", "mean_dims_keep", "mean_all", "mean_all_keep", "normalize_l2",
                    "normalize_l1_dim1", "identity_silu", "identity_gelu", "identity_tanh"],
    "matmul": ["matmul_2d", "matmul_batched", "matmul_bcast_batch", "matmul_bcast_2d", "matmul_1d_left",
               "matmul_1d_right", "matmul_1d_1d", "matmul_const"],
    "softmax": ["softmax_last", "softmax_dim1", "softmax_dim0_T", "softmax_dtype_f32"],
    "norm": ["rms_weight", "rms_noweight", "layer_norm_wb", "layer_norm_w", "layer_norm_plain"],
}
assert sorted(n for names in OPS.values() for n in names) == sorted(CASES), "every case belongs to one op file"
NO_MODULE = {"mean_dim1", "mean_dims_keep", "mean_all", "mean_all_keep", "normalize_l2", "normalize_l1_dim1"}
# what the Triton kernels take (1-D operands and broadcast batch dims stay on torch, with a reason)
TRITON_CASES = {"linear_bias", "linear_nobias", "linear_zerobias", "linear_1d_input", "matmul_2d",
                "matmul_batched", "softmax_last", "softmax_dim1", "softmax_dim0_T",
                "softmax_dtype_f32"}


def with_module(names):
    return [n for n in names if n not in NO_MODULE]


def with_triton(names):
    return [n for n in names if n in TRITON_CASES]


def conservative(names):
    return [n for n in names if CASES[n](gen_for(n), torch.float64, "contig").conservative]


def run_case(name, dtype, layout, view, seed_extra=""):
    """Build a case, run forward + backward in ``view``; returns (case, out, grads, start)."""
    gen = gen_for(name, str(dtype), layout, view, seed_extra)
    case = CASES[name](gen, dtype, layout)
    out = case.run(VIEW_MODULES[view], *case.inputs)
    g = torch.randn(out.shape, generator=gen).to(dtype=out.dtype, device=out.device)
    relevance = is_relevance_view(view)
    if relevance and dtype != torch.float64:
        start = torch.nan_to_num(out.detach() * g)  # relevance proportional to the activation
    else:
        start = g
    out.backward(start)
    if relevance and dtype != torch.float64:
        # the oracle's relevance is proportional to *its* (float64) activation, with the same G
        start = case.plain(*[t.detach().double() for t in case.inputs]).double() * g.double()
    return case, out, leaf_grads(case.inputs), start


# ---- the checks the op files run ------------------------------------------------------------------

def check_view_matches_oracle(name, dtype, layout, backend, view):
    """One case in one view on one backend: every input's relevance (R views) or gradient (G
    views) equals the oracle's, within TOL; constants get none."""
    with lrp_kernels.use_backend(backend):
        case, out, grads, start = run_case(name, dtype, layout, view)
    want = (case.oracle_R if is_relevance_view(view) else case.oracle_G)(case.inputs, start)
    what = "relevance" if is_relevance_view(view) else "gradient"
    for i, (g, w) in enumerate(zip(grads, want)):
        if w is None:
            assert g is None, f"input {i} is a constant and must get no {what}"
            continue
        assert g is not None, f"input {i} got no {what}"
        assert g.dtype == case.inputs[i].dtype and g.shape == case.inputs[i].shape
        err = rel_err(g, w)
        tol = max(TOL[dtype], TOL[out.dtype])  # softmax(dtype=...) may compute in a lower precision
        assert err <= tol, f"{name} {dtype} {layout} {view} {backend} input {i}: rel err {err:.3g} > {tol}"


def check_forward_equals_plain_op(name, dtype):
    gen = gen_for("fwd", name, str(dtype))
    case = CASES[name](gen, dtype, "transposed")
    for view in (F, G):
        out = case.run(view, *case.inputs)
        ref = case.plain(*case.inputs)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, equal_nan=True)


def check_conservation_eps_to_zero(name, view):
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


def check_bias_absorbs_relevance(name):
    """With a bias the epsilon rule is not conservative: the bias keeps ``b * R_z / z``."""
    gen = gen_for("absorb", name)
    case = CASES[name](gen, torch.float64, "contig", eps=1e-12)
    out = case.run(F, *case.inputs)
    start = out.detach().clone()  # R_z = z: the bias's share is sum(b * R_z / z) = n_rows * sum(b)
    out.backward(start)
    lost = (start.sum() - case.inputs[0].grad.sum()).abs()
    assert lost > 1e-3 * start.abs().sum()


def check_single_op_views_agree(name, dtype):
    """Per op: R-view relevance with R_out = out * G equals x * (G-view grad with G).

    The views agree up to rounding and O(eps / |x|) terms (identity, LayerNorm centring), so
    the rule epsilon is taken ~0 here."""
    gen = gen_for("agree", name, str(dtype))
    case_r = CASES[name](gen, dtype, "sliced", eps=1e-10)
    inputs_g = [t.detach().clone().requires_grad_(t.requires_grad) for t in case_r.inputs]
    out_r = case_r.run(F, *case_r.inputs)
    out_g = case_r.run(G, *inputs_g)
    g = torch.randn(out_r.shape, generator=gen).to(dtype)
    out_r.backward(out_r.detach() * g)
    out_g.backward(g)
    tol = 1e-8 if out_r.dtype == torch.float64 else 1e-5
    for tr, tg in zip(case_r.inputs, inputs_g):
        if tr.requires_grad:
            err = rel_err(tr.grad, tg.detach() * tg.grad)
            assert err <= tol, f"{name}: R-view vs x*G-view rel err {err:.3g}"


# ---- CUDA (run by the GPU job: pytest -m gpu) --------------------------------------------------------
# Each case is drawn with the same seed on the CPU and moved to the GPU, so the CUDA result (auto
# backend: triton where it has a kernel) is compared to the CPU torch backend on the same numbers;
# the CPU backend is itself checked against the float64 oracle. Tolerances: fp32 2e-3 (Triton dots
# may use TF32), bf16 3e-2 (two bf16 evaluations, each within 2e-2 of the oracle).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def check_cuda_matches_cpu_reference(name, dtype, view):
    with lrp_kernels.use_backend("torch"):
        _, out_c, grads_c, _ = run_case(name, dtype, "sliced", view)
    DEVICE[0] = "cuda"
    try:
        _, out_g, grads_g, _ = run_case(name, dtype, "sliced", view)
    finally:
        DEVICE[0] = "cpu"
    assert out_g.is_cuda
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=GPU_TOL[dtype], atol=1e-3, equal_nan=True)
    for gc, gg in zip(grads_c, grads_g):
        if gc is None:
            assert gg is None
            continue
        assert gg.is_cuda and gg.dtype == gc.dtype
        err = rel_err(gg.cpu(), gc)
        assert err <= GPU_TOL[dtype], f"{name} {dtype} {view}: CUDA vs CPU rel err {err:.3g}"


# ---- bad input: clear errors -------------------------------------------------------------------

def bad(*shape, dtype=torch.float32, device="cpu"):
    """A tensor for the bad-input tables (``meta``: a tensor on another device)."""
    return torch.randn(*shape, dtype=dtype) if device == "cpu" else torch.empty(*shape, dtype=dtype, device=device)


def check_bad_input_raises_clear_error(entry, view):
    """``entry``: (call, exception type, words the message must contain)."""
    call, exc, words = entry
    with pytest.raises(exc) as info:
        call(view)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"error message {msg!r} should mention {w!r}"
