"""Triton kernels vs the float64 oracle (tests/oracle.py) and vs the torch backend.

On CPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), float32
only (the interpreter's bf16 arithmetic is not the GPU's). ``@pytest.mark.gpu`` tests cover
bf16 / fp16 and larger shapes on a CUDA device.

Every launch goes through a NaN-poisoned allocator (``poison`` fixture), so an element the
kernel forgot to write shows up as NaN.

Inputs for the oracle comparison are dyadic (small multiples of 1/8): ``x @ W.T`` is then
exact in float32, so the float32 ``z`` the kernels divide by is the oracle's float64 ``z``;
with gaussian inputs a ``z`` near 0 amplifies float32 rounding (ill-conditioned, not a bug).
Gaussian inputs are compared with the torch backend (same float32 ``z``).

Tolerances (norm-wise relative): float32 1e-5; on GPU bf16 2e-2, fp16 5e-3 (TF32 dot).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lrp_kernels
from lrp_kernels.backends import dispatch

pytest.importorskip("triton")
from helpers import oracle  # noqa: E402

TRITON_OK, TRITON_WHY = dispatch.backend_status("triton")
pytestmark = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")

import lrp_kernels.backends.triton as tb  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _fixed_gpu_config(monkeypatch):
    """One tile config on GPU (autotuning would compile seven per variant); the benchmark
    checks the autotuned configs' results against the torch backend."""
    monkeypatch.setenv("LRP_KERNELS_TRITON_AUTOTUNE", "0")


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as NaN; returns the list of allocations (proves the kernel path ran)."""
    made = []

    def alloc(shape, dtype, device):
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(tb, "alloc_output", alloc)
    return made


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite element (unwritten output or NaN)"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def dyadic(*shape, gen, scale=8):
    return (torch.randint(-2 * scale, 2 * scale + 1, shape, generator=gen) / scale).to(DEV)


def gauss(*shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(DEV, dtype)


def triton_call(op, *args):
    with lrp_kernels.use_backend("triton"):
        name, _ = dispatch.resolve(op, *args)
        assert name == "triton"
        return dispatch.call(op, *args)


# ---- epsilon linear ---------------------------------------------------------------------------

LINEAR_CASES = [  # (x shape, N): odd sizes, batched leading dims, M = 1
    ((37, 29), 45),
    ((2, 5, 29), 45),
    ((1, 33), 17),
]


@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("x_shape,n", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_vs_oracle(poison, relevance, x_shape, n, with_bias):
    gen = torch.Generator().manual_seed(hash((x_shape, n, relevance, with_bias)) % 2**31)
    k = x_shape[-1]
    x, w = dyadic(*x_shape, gen=gen), dyadic(n, k, gen=gen)
    b = dyadic(n, gen=gen) if with_bias else None
    g = gauss(*x_shape[:-1], n, gen=gen)
    z = torch.nn.functional.linear(x, w, b)
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    want = (oracle.linear_epsilon_R if relevance else oracle.linear_epsilon_G)(x, w, b, g, 1e-6)
    assert len(poison) == 1
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_linear_vs_torch_noncontiguous(poison, relevance, recompute):
    gen = torch.Generator().manual_seed(11 + relevance + 2 * recompute)
    m, n, k = 37, 45, 29
    x = gauss(m, 2 * k, gen=gen)[:, ::2]            # strided columns
    w = gauss(k, n, gen=gen).t()                     # transposed weight [N, K]
    b = gauss(n, gen=gen)
    g = gauss(n, m, gen=gen).t()                     # column-major grad
    z = None if recompute else torch.nn.functional.linear(x, w, b)
    assert not (x.is_contiguous() or w.is_contiguous() or g.is_contiguous())
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    want = dispatch.call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance, backend="torch")
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("relevance", [True, False])
def test_swapped_tile_variant(poison, monkeypatch, relevance):
    """The SWAP_AB config (transposed tile W^T @ h^T, autotuned on GPU) gives the same result."""
    from lrp_kernels.backends.triton import linear_epsilon as lin
    for name in ("INTERPRET_CONFIG", "FIXED_CONFIG"):
        monkeypatch.setitem(getattr(lin, name), "SWAP_AB", True)
    gen = torch.Generator().manual_seed(13 + relevance)
    x, w, b = dyadic(2, 37, 29, gen=gen), dyadic(45, 29, gen=gen), dyadic(45, gen=gen)
    g = gauss(2, 37, 45, gen=gen)
    z = torch.nn.functional.linear(x, w, b)
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    want = (oracle.linear_epsilon_R if relevance else oracle.linear_epsilon_G)(x, w, b, g, 1e-6)
    assert rel_err(got, want) < TOL[torch.float32]
    a, bb = dyadic(2, 37, 16, gen=gen), dyadic(2, 16, 45, gen=gen)
    ga, gb = triton_call("matmul_ue_backward", g, a, bb, a @ bb, 1e-6, relevance, True, True)
    wa, wb = (oracle.matmul_R if relevance else oracle.matmul_G)(a, bb, g, 1e-6)
    assert rel_err(ga, wa) < TOL[torch.float32] and rel_err(gb, wb) < TOL[torch.float32]


def test_linear_zero_z_is_finite(poison):
    """z == 0 exactly: stab(0) = +eps, never 0 (no inf / NaN)."""
    gen = torch.Generator().manual_seed(3)
    x, w = gauss(5, 16, gen=gen), gauss(20, 16, gen=gen)
    z = torch.nn.functional.linear(x, w)
    z[:, :4] = 0.0
    g = gauss(5, 20, gen=gen) * 1e-6
    got = triton_call("linear_epsilon_backward", g, x, w, None, z, 1e-6, True)
    want = dispatch.call("linear_epsilon_backward", g, x, w, None, z, 1e-6, True, backend="torch")
    assert rel_err(got, want) < TOL[torch.float32]


def test_linear_public_api_both_views_agree(poison):
    """functional (R-view) and grad (G-view) drop-ins on the triton backend: R_x == x * G_x."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = dyadic(7, 24, gen=gen), dyadic(19, 24, gen=gen), dyadic(19, gen=gen)
    with lrp_kernels.use_backend("triton"):
        xr = x.clone().requires_grad_()
        y = lrp_kernels.functional.linear_epsilon(xr, w, b)
        y.backward(y.detach())
        xg = x.clone().requires_grad_()
        y2 = lrp_kernels.grad.linear_epsilon(xg, w, b)
        y2.backward(torch.ones_like(y2))
    assert len(poison) == 2
    want = oracle.linear_epsilon_R(x, w, b, y.detach(), 1e-6)
    assert rel_err(xr.grad, want) < TOL[torch.float32]
    assert rel_err(x * xg.grad, want) < TOL[torch.float32]


# ---- Deep-Taylor softmax ------------------------------------------------------------------------

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
    want = (oracle.softmax_R if relevance else oracle.softmax_G)(x, g, dim=dim, T=temperature)
    ref = dispatch.call("softmax_dt_backward", g, x, s, dim % len(shape), temperature, relevance,
                        backend="torch")
    masked = torch.isneginf(x) | (x <= torch.finfo(x.dtype).min)
    assert (got[masked] == 0).all(), "masked logits must get exactly 0"
    assert rel_err(got, want) < TOL[torch.float32]
    assert rel_err(got, ref) < TOL[torch.float32]


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
    assert rel_err(got, oracle.softmax_R(x, g, dim=1)) < TOL[torch.float32]


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
    want = (oracle.softmax_R if relevance else oracle.softmax_G)(x, g, dim=1)
    assert rel_err(got, want) < TOL[torch.float32]


# ---- uniform-epsilon matmul ----------------------------------------------------------------------

MATMUL_CASES = [  # (a shape, b shape)
    ((37, 29), (29, 45)),
    ((2, 3, 37, 16), (2, 3, 16, 45)),   # attention-like [B, H, N, d] @ [B, H, d, N]
    ((1, 33, 17), (1, 17, 5)),
]
NEEDS = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("a_shape,b_shape", MATMUL_CASES)
@pytest.mark.parametrize("need_a,need_b", NEEDS)
def test_matmul_vs_oracle(poison, relevance, a_shape, b_shape, need_a, need_b):
    gen = torch.Generator().manual_seed(hash((a_shape, relevance, need_a, need_b)) % 2**31)
    a, b = dyadic(*a_shape, gen=gen), dyadic(*b_shape, gen=gen)
    o = a @ b
    g = gauss(*o.shape, gen=gen)
    ga, gb = triton_call("matmul_ue_backward", g, a, b, o, 1e-6, relevance, need_a, need_b)
    share = 2.0 if (need_a and need_b) else 1.0
    wa, wb = (oracle.matmul_R if relevance else oracle.matmul_G)(a, b, g, 1e-6, share)
    assert len(poison) == need_a + need_b
    assert (ga is None) == (not need_a) and (gb is None) == (not need_b)
    if need_a:
        assert rel_err(ga, wa) < TOL[torch.float32]
    if need_b:
        assert rel_err(gb, wb) < TOL[torch.float32]


@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_matmul_vs_torch_noncontiguous(poison, relevance, recompute):
    gen = torch.Generator().manual_seed(31 + relevance + 2 * recompute)
    q = gauss(2, 37, 3, 16, gen=gen).transpose(1, 2)      # [B, H, N, d] from [B, N, H, d]
    k_t = gauss(2, 3, 45, 16, gen=gen).transpose(-1, -2)  # K^T as a view
    o = None if recompute else q @ k_t
    g = gauss(2, 3, 45, 37, gen=gen).transpose(-1, -2)
    got = triton_call("matmul_ue_backward", g, q, k_t, o, 1e-6, relevance, True, True)
    want = dispatch.call("matmul_ue_backward", g, q, k_t, o, 1e-6, relevance, True, True,
                         backend="torch")
    for t, w in zip(got, want):
        assert rel_err(t, w) < TOL[torch.float32]


def test_matmul_public_api_uses_triton(poison):
    gen = torch.Generator().manual_seed(41)
    a = dyadic(2, 9, 16, gen=gen).requires_grad_()
    b = dyadic(2, 16, 11, gen=gen).requires_grad_()
    with lrp_kernels.use_backend("triton"):
        o = lrp_kernels.functional.matmul(a, b)
        o.backward(o.detach())
    wa, wb = oracle.matmul_R(a, b, o.detach(), 1e-6)
    assert len(poison) == 2
    assert rel_err(a.grad, wa) < TOL[torch.float32] and rel_err(b.grad, wb) < TOL[torch.float32]


# ---- supports / probe / fallback ----------------------------------------------------------------

def test_broadcast_matmul_falls_back_with_reason():
    a, b = torch.randn(2, 3, 5, 4, device=DEV), torch.randn(4, 6, device=DEV)
    g = torch.randn(2, 3, 5, 6, device=DEV)
    args = (g, a, b, None, 1e-6, True, True, True)
    from lrp_kernels.backends.triton.matmul_ue import supports
    assert "broadcast" in supports(*args)
    with pytest.raises(dispatch.BackendUnavailableError, match="broadcast"):
        with lrp_kernels.use_backend("triton"):
            dispatch.call("matmul_ue_backward", *args)
    assert dispatch.resolve("matmul_ue_backward", *args)[0] in ("torch", "cpp")


def test_supports_reasons(monkeypatch):
    from lrp_kernels.backends.triton.linear_epsilon import supports as lin
    from lrp_kernels.backends.triton.softmax_dt import supports as sm
    x = torch.randn(3, 4, dtype=torch.float64, device=DEV)
    w = torch.randn(5, 4, dtype=torch.float64, device=DEV)
    g64 = torch.randn(3, 5, dtype=torch.float64, device=DEV)
    assert "float64" in lin(g64, x, w, None, None, 1e-6, True)
    assert lin(g64.float(), x.float(), w.float(), None, None, 1e-6, True) is None
    assert "grad_z" in lin(torch.randn(3, 6, device=DEV), x.float(), w.float(), None, None, 1e-6, True)
    v3, v4 = torch.randn(3, device=DEV), torch.randn(4, device=DEV)
    assert "one shape" in sm(v3, v4, v4, 0, 1.0, True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = [t.cpu() for t in (g64.float(), x.float(), w.float())]
    why = lin(*cpu, None, None, 1e-6, True)
    assert "TRITON_INTERPRET=1" in why and "cpu" in why


def test_probe_reason_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = tb.probe()
    assert not ok and "no CUDA device" in why and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = tb.probe()
    assert ok and "interpreter" in why


def test_import_without_triton_never_crashes():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from lrp_kernels.backends import dispatch\n"
            "ok, why = dispatch.backend_status('triton')\n"
            "assert not ok and 'not importable' in why, why\n"
            "print('OK', why)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_auto_never_picks_interpreter():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    z = x @ w.t()
    assert dispatch.resolve("linear_epsilon_backward", torch.randn(3, 5), x, w, None, z, 1e-6,
                            True, backend="auto")[0] != "triton"


# ---- GPU: bf16 / fp16 / larger shapes --------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("relevance", [True, False])
def test_gpu_linear(poison, dtype, relevance):
    gen = torch.Generator().manual_seed(101)
    m, n, k = 777, 1000, 515
    x = dyadic(3, m, k, gen=gen).to(dtype)
    w = (dyadic(n, k, gen=gen) / 8).to(dtype)
    b = dyadic(n, gen=gen).to(dtype)
    z = torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype)
    g = gauss(3, m, n, gen=gen, dtype=dtype)
    got = triton_call("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
    assert got.dtype == dtype and got.is_cuda
    # oracle on the z the kernel saw (rounded to dtype): the rule is applied to that z
    zd = z.double()
    h = g.double() / oracle.stab(zd, 1e-6)
    if not relevance:
        h = h * zd
    want = h @ w.double()
    if relevance:
        want = want * x.double()
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.gpu
@gpu
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
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("relevance", [True, False])
def test_gpu_matmul_attention_shapes(poison, dtype, relevance):
    gen = torch.Generator().manual_seed(7)
    q = dyadic(2, 4, 333, 64, gen=gen).to(dtype)
    k_t = dyadic(2, 4, 64, 333, gen=gen).to(dtype).contiguous()
    o = (q.float() @ k_t.float()).to(dtype)
    g = gauss(2, 4, 333, 333, gen=gen, dtype=dtype)
    ga, gb = triton_call("matmul_ue_backward", g, q, k_t, o, 1e-6, relevance, True, True)
    od = o.double()
    h = g.double() / (2 * oracle.stab(od, 1e-6))
    if not relevance:
        h = h * od
    wa, wb = h @ k_t.double().transpose(-1, -2), q.double().transpose(-1, -2) @ h
    if relevance:
        wa, wb = wa * q.double(), wb * k_t.double()
    assert rel_err(ga, wa) < TOL[dtype] and rel_err(gb, wb) < TOL[dtype]
