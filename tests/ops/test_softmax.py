"""Deep-Taylor softmax (lrp_kernels.ops.softmax): every view (relevance drop-in, gradient drop-in,
``SoftmaxDT`` module in both views) on every backend (torch; triton through the interpreter on
CPU) against the float64 oracle, masks, bad input, and the Triton kernel itself.

``TestSoftmax`` runs the common op contract (tests/helpers/contract.py) on this op's cases; the
functions below it are this op's own tests.

Case table, views and tolerances: tests/helpers/cases.py; kernel-level inputs and tolerances:
tests/helpers/kernels.py. Kernel calls go through a NaN-poisoned allocator (``poison``), so an
element the kernel forgot to write shows up as NaN.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import modules as M
from lrp_kernels.backends import dispatch

from helpers import oracle as O
from helpers.cases import DTYPES, OPS, TOL, bad, gen_for, rand, rel_err
from helpers.contract import OpContract
from helpers.kernels import GPU_DTYPES, TOL as KERNEL_TOL, gauss, gpu, needs_triton, triton_call

pytestmark = pytest.mark.usefixtures("fixed_triton_config")


# ---- the common op contract on this op's cases (tests/helpers/contract.py) --------------------------

class TestSoftmax(OpContract):
    """Runs the common op contract (helpers/contract.py) on NAMES; the functions below are this op's own tests."""
    NAMES = OPS["softmax"]
    BAD_INPUTS = [  # (call on a view module, exception type, words the message must contain)
        (lambda V: V.softmax(bad(2, 3), 2), ValueError, ["dim"]),
        (lambda V: V.softmax(bad(2, 3), -3), ValueError, ["dim"]),
        (lambda V: V.softmax(bad(2, 3), -1, None, 0.0), ValueError, ["temperature"]),
        (lambda V: V.softmax(torch.ones(2, 3, dtype=torch.int64), -1), TypeError, ["x", "floating"]),
    ]


# ---- the rule's own properties ---------------------------------------------------------------------

def test_softmax_dt_is_not_conservative():
    """The rule 'with bias' absorbs relevance: with R_s = s each row's relevance sums to 0."""
    gen = gen_for("sm-absorb")
    x = rand(gen, (4, 9), torch.float64)
    s = F.softmax(x, -1)
    s.backward(s.detach())
    torch.testing.assert_close(x.grad.sum(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert s.detach().sum() > 3.9  # while 4 units of relevance came in


# ---- the module ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,temperature", [(-1, 1.0), (1, 0.5)])
def test_softmax_dt_module(dim, temperature):
    x = rand(gen_for("sm-mod", dim), (2, 6, 5), torch.float64, "transposed")
    mod = M.SoftmaxDT(dim=dim, temperature=temperature)
    torch.testing.assert_close(mod(x), nn.Softmax(dim=dim)(x / temperature))
    y = mod(x)
    y.backward(y.detach())
    torch.testing.assert_close(x.grad, O.softmax_R(x, y.detach(), dim, temperature), rtol=1e-10, atol=1e-12)
    assert "temperature" in repr(mod)


def test_softmax_dt_module_dtype_arg():
    x = rand(gen_for("sm-dtype"), (3, 7), torch.bfloat16)
    mod = M.SoftmaxDT(dim=-1, dtype=torch.float32)
    y = mod(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.softmax(x, -1, dtype=torch.float32))
    y.backward(y.detach())
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


# ---- masks ----------------------------------------------------------------------------------------

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


# ---- the Triton kernel (softmax_dt_backward) --------------------------------------------------------

def masked_logits(shape, dim, gen, dtype=torch.float32):
    """Random logits with -inf entries, a dtype-minimum entry and one fully masked row."""
    x = gauss(*shape, gen=gen, dtype=dtype)
    xm = x.movedim(dim, -1)  # view: edits land in x
    idx = [0] * (xm.dim() - 1)
    xm[tuple(idx)][: xm.shape[-1] // 3] = float("-inf")                      # partly masked row
    if xm.numel() // xm.shape[-1] > 1:
        last = tuple(s - 1 for s in xm.shape[:-1])
        xm[last] = float("-inf")                                              # fully masked row
    flat_mid = tuple(s // 2 for s in xm.shape[:-1])
    xm[flat_mid][1] = torch.finfo(dtype).min                                  # dtype-min mask
    return x


SOFTMAX_CASES = [  # (shape, dim): short rows, looped long rows (> 128 under the interpreter), dims
    ((3, 45), -1),
    ((4, 300), 1),
    ((3, 45, 5), 1),
    ((2, 3, 7, 37), -1),
    ((37, 4), 0),
]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softmax_vs_oracle_and_torch(poison, relevance, shape, dim, temperature):
    gen = torch.Generator().manual_seed(hash((shape, dim, relevance, temperature)) % 2**31)
    x = masked_logits(shape, dim, gen)
    s = torch.softmax(x / temperature, dim)
    g = gauss(*shape, gen=gen)
    if relevance:  # realistic incoming relevance: zero where s is zero (masked)
        g = g * torch.nan_to_num(s, nan=0.0)
    got = triton_call("softmax_dt_backward", g, x, s, dim % len(shape), temperature, relevance)
    want = (O.softmax_R if relevance else O.softmax_G)(x, g, dim=dim, T=temperature)
    ref = dispatch.call("softmax_dt_backward", g, x, s, dim % len(shape), temperature, relevance,
                        backend="torch")
    masked = torch.isneginf(x) | (x <= torch.finfo(x.dtype).min)
    assert (got[masked] == 0).all(), "masked logits must get exactly 0"
    assert rel_err(got, want) < KERNEL_TOL[torch.float32]
    assert rel_err(got, ref) < KERNEL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("per_program", [1, 64, 4096])
def test_softmax_rows_per_program(poison, monkeypatch, per_program):
    """1, 2 (with a partial last program) or many short rows per program: same result."""
    from lrp_kernels.backends.triton import softmax_dt
    monkeypatch.setattr(softmax_dt, "ELEMS_PER_PROGRAM_INTERPRET", per_program)
    monkeypatch.setattr(softmax_dt, "ELEMS_PER_PROGRAM", per_program)
    gen = torch.Generator().manual_seed(per_program)
    x = masked_logits((7, 33), -1, gen)
    s = torch.softmax(x, -1)
    g = gauss(7, 33, gen=gen) * torch.nan_to_num(s)
    got = triton_call("softmax_dt_backward", g, x, s, 1, 1.0, True)
    assert rel_err(got, O.softmax_R(x, g, dim=1)) < KERNEL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("relevance", [True, False])
def test_softmax_noncontiguous_and_fully_masked(poison, relevance):
    gen = torch.Generator().manual_seed(21)
    base = gauss(6, 2 * 150, gen=gen)
    x = base[:, ::2]                       # strided rows, length 150: looped path
    x[2] = float("-inf")                   # fully masked: s is NaN there
    x[4] = torch.finfo(torch.float32).min  # fully masked with the dtype minimum: s uniform
    s = torch.softmax(x, -1)
    g = gauss(150, 6, gen=gen).t()
    got = triton_call("softmax_dt_backward", g, x, s, 1, 1.0, relevance)
    assert (got[2] == 0).all() and (got[4] == 0).all()
    want = (O.softmax_R if relevance else O.softmax_G)(x, g, dim=1)
    assert rel_err(got, want) < KERNEL_TOL[torch.float32]


# ---- CUDA (run by the GPU job: pytest -m gpu) --------------------------------------------------------

@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("length", [1000, 4096, 20000])
def test_gpu_softmax(poison, dtype, relevance, length):
    gen = torch.Generator().manual_seed(length)
    x = masked_logits((2, 8, length), -1, gen, dtype=dtype)
    s = torch.softmax(x.float(), -1).to(dtype)
    g = gauss(2, 8, length, gen=gen, dtype=dtype)
    if relevance:
        g = (g.float() * torch.nan_to_num(s.float())).to(dtype)
    got = triton_call("softmax_dt_backward", g, x, s, 2, 1.0, relevance)
    want = dispatch.call("softmax_dt_backward", g.double(), x.double(), s.double(), 2, 1.0, relevance,
                         backend="torch")
    masked = torch.isneginf(x) | (x <= torch.finfo(dtype).min)
    assert (got[masked] == 0).all()
    assert rel_err(got, want) < KERNEL_TOL[dtype]
