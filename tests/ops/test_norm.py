"""RMSNorm (identity rule) and LayerNorm (lrp_kernels.ops.norm): every view (relevance drop-in,
gradient drop-in, ``RMSNormIdentity`` / ``LayerNormIdentity`` modules in both views) on every
backend (torch; cpp, which ``auto`` picks for CPU tensors wherever the extension is built)
against the float64 oracle, the modules' ``nn.RMSNorm`` / ``nn.LayerNorm`` contract, bad input,
and the C++ kernels themselves (kernel ops vs oracle and torch fallback, public drop-ins per
call / ``use_backend`` / auto; building and falling back: tests/backends/test_cpp_build.py).

``TestNorm`` runs the common op contract (tests/helpers/contract.py) on this op's cases; the
functions below it are this op's own tests.

Case table, views and tolerances: tests/helpers/cases.py; C++ inputs and tolerances:
tests/helpers/cpp.py.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import lrp_kernels.functional as F
import lrp_kernels.grad as G
from lrp_kernels import modules as M
from lrp_kernels.backends import dispatch

from helpers import oracle as O
from helpers.cases import OPS, bad, check_bias_absorbs_relevance, gen_for, rand, rel_err
from helpers.contract import OpContract
from helpers.cpp import (OPS as CPP_OPS, ORACLE_TOL, _cpp, assert_ln_relevance, close_to_torch,
                         extension_or_skip, inputs, rel)


# ---- the common op contract on this op's cases (tests/helpers/contract.py) --------------------------

class TestNorm(OpContract):
    """Runs the common op contract (helpers/contract.py) on NAMES; the functions below are this op's own tests."""
    NAMES = OPS["norm"]
    BAD_INPUTS = [  # (call on a view module, exception type, words the message must contain)
        (lambda V: V.rms_norm_identity(bad(2, 5), bad(4)), ValueError, ["weight", "(5,)"]),
        (lambda V: V.rms_norm_identity(bad(2, 5), bad(5), -1.0), ValueError, ["eps"]),
        (lambda V: V.rms_norm_identity(bad(2, 5), bad(5, device="meta")), ValueError, ["device"]),
        (lambda V: V.layer_norm(bad(2, 5), bad(5), bad(3)), ValueError, ["bias", "(5,)"]),
        (lambda V: V.layer_norm(bad(2, 5), None, None, 1e-5, epsilon=-1.0), ValueError, ["epsilon"]),
        (lambda V: V.layer_norm(torch.ones(2, 5, dtype=torch.int64)), TypeError, ["x", "floating"]),
    ]


# ---- the rule's own properties ---------------------------------------------------------------------

def test_bias_absorbs_relevance():
    check_bias_absorbs_relevance("layer_norm_wb")


# ---- the modules -----------------------------------------------------------------------------------

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
    y = mod(x)
    y.backward(y.detach())
    want = O.layer_norm_R(x, mod.weight, mod.bias, y.detach(), 1e-5, mod.epsilon)
    assert rel_err(x.grad, want) <= 1e-10


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
    xr = x.detach().clone().requires_grad_()
    mod(xr).backward(start)
    torch.testing.assert_close(xr.grad, start, rtol=0, atol=0)  # identity rule
    mod_g = M.RMSNormIdentity(10, eps=1e-6, dtype=torch.float64, relevance=False)
    mod_g.load_state_dict(ref.state_dict())
    xg = x.detach().clone().requires_grad_()
    mod_g(xg).backward(start)
    assert rel_err(xg.grad, O.rms_norm_G(x, ref.weight, start, 1e-6)) <= 1e-10


# ---- the C++ kernels: kernel ops vs oracle and torch fallback ---------------------------------------

SHAPES = [(37,), (5, 67), (2, 3, 129), (3, 1000), (2, 1)]  # 1-D, 2-D, batched, odd / tiny hidden
CPP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(scope="session")
def ext():
    """The compiled extension (built once per machine; skipped only where nothing can build it)."""
    return extension_or_skip()


@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["w", "no_w"])
def test_rms_norm_ops(ext, shape, dtype, weight):
    x, w, _, gy = inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1], weight=weight)
    eps = 1e-6
    y, rstd = dispatch.call("rms_norm_forward", x, w, eps, backend="cpp")
    y_t, rstd_t = dispatch.call("rms_norm_forward", x, w, eps, backend="torch")
    assert rstd.dtype == rstd_t.dtype and rstd.shape == rstd_t.shape == shape[:-1]
    close_to_torch(y, y_t, dtype)
    torch.testing.assert_close(rstd, rstd_t, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    assert rel(y, O.rms_norm(x, w, eps)) < ORACLE_TOL[dtype]
    # the statistics alone (what a patch uses next to the module's own forward): the same rstd
    for backend in ("cpp", "torch"):
        alone = dispatch.call("rms_norm_rstd", x, eps, backend=backend)
        assert alone.dtype == rstd_t.dtype and alone.shape == shape[:-1]
        torch.testing.assert_close(alone, rstd_t, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    want = 1 / (x.double().pow(2).mean(-1) + eps).sqrt()
    assert rel(dispatch.call("rms_norm_rstd", x, eps, backend="cpp"), want) < (1e-12 if dtype == torch.float64 else 1e-6)

    gx = dispatch.call("rms_norm_backward", gy, w, rstd, backend="cpp")
    close_to_torch(gx, dispatch.call("rms_norm_backward", gy, w, rstd_t, backend="torch"), dtype)
    assert rel(gx, O.rms_norm_G(x, w, gy, eps)) < ORACLE_TOL[dtype]


@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("params", ["wb", "w", "none"])
def test_layer_norm_ops(ext, shape, dtype, params):
    x, w, b, gy = inputs(shape, dtype, seed=7 + shape[-1], weight="w" in params, bias="b" in params)
    eps, epsilon = 1e-5, 1e-6
    y, mu, rstd = dispatch.call("layer_norm_forward", x, w, b, eps, backend="cpp")
    y_t, mu_t, rstd_t = dispatch.call("layer_norm_forward", x, w, b, eps, backend="torch")
    for s, s_t in ((mu, mu_t), (rstd, rstd_t)):
        assert s.dtype == s_t.dtype and s.shape == s_t.shape == shape[:-1]
        torch.testing.assert_close(s, s_t, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)
    close_to_torch(y, y_t, dtype)
    assert rel(y, O.layer_norm(x, w, b, eps)) < ORACLE_TOL[dtype]

    g_view = dispatch.call("layer_norm_backward", gy, x, w, b, mu, rstd, epsilon, False, backend="cpp")
    g_view_t = dispatch.call("layer_norm_backward", gy, x, w, b, mu_t, rstd_t, epsilon, False, backend="torch")
    close_to_torch(g_view, g_view_t, dtype) if shape[-1] > 1 else None  # H=1: both are 0 +- rounding
    if shape[-1] > 1:
        assert rel(g_view, O.layer_norm_G(x, w, gy, eps)) < ORACLE_TOL[dtype]
    else:
        assert g_view.abs().max() == 0  # u - mean(u) of one element

    r_view = dispatch.call("layer_norm_backward", gy, x, w, b, mu, rstd, epsilon, True, backend="cpp")
    r_view_t = dispatch.call("layer_norm_backward", gy, x, w, b, mu_t, rstd_t, epsilon, True, backend="torch")
    if shape[-1] > 1:
        assert_ln_relevance(r_view, x, w, b, gy, eps, epsilon, dtype)
    else:  # x * (n - mean(n)) with one element: exactly zero
        assert r_view.abs().max() == 0 and r_view_t.abs().max() == 0


def test_cpp_non_contiguous_inputs(ext):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(67, 6, generator=g)
    x = base.t()  # [6, 67], last dim strided
    sliced = torch.randn(4, 134, generator=g)[:, ::2]  # [4, 67], stride 2
    w, b = torch.randn(67, generator=g), torch.randn(67, generator=g)
    for t in (x, sliced, torch.randn(3, 8, 67, generator=g).transpose(0, 1)):
        assert not t.is_contiguous()
        y, rstd = dispatch.call("rms_norm_forward", t, w, 1e-6, backend="cpp")
        assert rel(y, O.rms_norm(t, w, 1e-6)) < 1e-5
        gy = torch.randn(t.shape[::-1], generator=g).permute(*reversed(range(t.dim())))  # strided too
        gx = dispatch.call("rms_norm_backward", gy, w, rstd, backend="cpp")
        assert rel(gx, O.rms_norm_G(t, w, gy, 1e-6)) < 1e-5
        y, mu, rs = dispatch.call("layer_norm_forward", t, w, b, 1e-5, backend="cpp")
        assert rel(y, O.layer_norm(t, w, b, 1e-5)) < 1e-5
        r = dispatch.call("layer_norm_backward", gy, t, w, b, mu, rs, 1e-6, True, backend="cpp")
        assert_ln_relevance(r, t, w, b, gy, 1e-5, 1e-6, torch.float32)
        # non-contiguous statistics and weights too
        w_nc, rstd_nc = torch.stack([w, w], 1)[:, 0], torch.stack([rstd, rstd], -1)[..., 0]
        assert not w_nc.is_contiguous() and not rstd_nc.is_contiguous()
        gx2 = dispatch.call("rms_norm_backward", gy, w_nc, rstd_nc, backend="cpp")
        torch.testing.assert_close(gx2, gx, rtol=0, atol=0)


def test_cpp_mixed_dtype_params(ext):
    """bf16 activations with float32 weights (a common mixed-precision set-up), as torch does it."""
    x, _, _, gy = inputs((4, 96), torch.bfloat16, seed=11)
    w, b = torch.randn(96), torch.randn(96)
    y, rstd = dispatch.call("rms_norm_forward", x, w, 1e-6, backend="cpp")
    close_to_torch(y, dispatch.call("rms_norm_forward", x, w, 1e-6, backend="torch")[0], torch.bfloat16)
    y, mu, rs = dispatch.call("layer_norm_forward", x, w, b, 1e-5, backend="cpp")
    close_to_torch(y, dispatch.call("layer_norm_forward", x, w, b, 1e-5, backend="torch")[0], torch.bfloat16)


# ---- the C++ kernels through the public drop-ins: per-call backend, use_backend, auto ----------------

@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the cpp kernels, to prove the rule really ran on this backend."""
    counts = {op: 0 for op in CPP_OPS}
    for op in CPP_OPS:
        impl = dispatch._REGISTRY[op]["cpp"]

        def wrapped(*a, _fn=impl.fn, _op=op, **k):
            counts[_op] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(impl, "fn", wrapped)
    return counts


def run_both_views(how, drop_in, x, gy, *args, **drop_in_kw):
    """The drop-in ``drop_in`` on a fresh leaf copy of ``x`` in the R and G views, backward with
    ``gy``, on the cpp backend chosen ``how`` (per call ``backend=``, ``use_backend``, or auto);
    returns {"R": (output, x's grad), "G": (output, x's grad)}."""
    kw = dict(drop_in_kw, **({"backend": "cpp"} if how == "backend=" else {}))
    outs = {}
    for name, view in (("R", F), ("G", G)):
        xr = x.clone().requires_grad_()
        with dispatch.use_backend("cpp") if how == "use_backend" else contextlib.nullcontext():
            y = getattr(view, drop_in)(xr, *args, **kw)
            y.backward(gy)
        outs[name] = (y, xr.grad)
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", ["backend=", "use_backend", "auto"])
def test_public_rms_norm_both_views(ext, spy, monkeypatch, dtype, how):
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    x, w, _, gy = inputs((2, 3, 129), dtype, seed=5)
    outs = run_both_views(how, "rms_norm_identity", x, gy, w, 1e-6)
    assert spy["rms_norm_forward"] == 2 and spy["rms_norm_backward"] == 1  # R view: no kernel
    tol = ORACLE_TOL[dtype]
    assert rel(outs["G"][0], O.rms_norm(x, w, 1e-6)) < tol
    assert torch.equal(outs["R"][1], gy)  # identity rule: R_x = R_y exactly
    assert rel(outs["G"][1], O.rms_norm_G(x, w, gy, 1e-6)) < tol
    # relevance of x in the G view is x * G_x; same total as the R view up to the rule (not conservative)
    assert torch.isfinite(outs["G"][1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", ["backend=", "use_backend", "auto"])
def test_public_layer_norm_both_views(ext, spy, monkeypatch, dtype, how):
    monkeypatch.delenv("LRP_KERNELS_BACKEND", raising=False)
    x, w, b, gy = inputs((3, 4, 67), dtype, seed=9)
    outs = run_both_views(how, "layer_norm", x, gy, w, b, 1e-5, epsilon=1e-6)
    for y, _ in outs.values():
        assert rel(y, O.layer_norm(x, w, b, 1e-5)) < ORACLE_TOL[dtype]
    assert spy["layer_norm_forward"] == 2 and spy["layer_norm_backward"] == 2
    assert_ln_relevance(outs["R"][1], x, w, b, gy, 1e-5, 1e-6, dtype)
    assert rel(outs["G"][1], O.layer_norm_G(x, w, gy, 1e-5)) < ORACLE_TOL[dtype]


# ---- CUDA (run by the GPU job: pytest -m gpu) --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpp_cuda_tensors(ext):
    x, w, b, gy = (t.cuda() for t in inputs((5, 3, 1031), torch.float32, seed=2))
    if not getattr(ext, "with_cuda", False):
        assert "without CUDA" in _cpp._supports_tensor(x)
        pytest.skip("extension built without CUDA (no nvcc / CUDA_HOME)")
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd, bd, gd = (t.to(dtype) for t in (x, w, b, gy))
        y, rstd = dispatch.call("rms_norm_forward", xd, wd, 1e-6, backend="cpp")
        assert y.is_cuda and rel(y.cpu(), O.rms_norm(xd.cpu(), wd.cpu(), 1e-6)) < ORACLE_TOL[dtype]
        gx = dispatch.call("rms_norm_backward", gd, wd, rstd, backend="cpp")
        assert rel(gx.cpu(), O.rms_norm_G(xd.cpu(), wd.cpu(), gd.cpu(), 1e-6)) < ORACLE_TOL[dtype]
        y, mu, rs = dispatch.call("layer_norm_forward", xd, wd, bd, 1e-5, backend="cpp")
        assert rel(y.cpu(), O.layer_norm(xd.cpu(), wd.cpu(), bd.cpu(), 1e-5)) < ORACLE_TOL[dtype]
        out = dispatch.call("layer_norm_backward", gd, xd, wd, bd, mu, rs, 1e-6, False, backend="cpp")
        assert rel(out.cpu(), O.layer_norm_G(xd.cpu(), wd.cpu(), gd.cpu(), 1e-5)) < ORACLE_TOL[dtype]
        out = dispatch.call("layer_norm_backward", gd, xd, wd, bd, mu, rs, 1e-6, True, backend="cpp")
        assert_ln_relevance(out.cpu(), xd.cpu(), wd.cpu(), bd.cpu(), gd.cpu(), 1e-5, 1e-6, dtype)


def test_rms_norm_identity_with_the_modules_forward_computes_only_the_statistics(monkeypatch):
    """Given the module's own forward (what patches pass), the rule computes rstd alone: no second
    normalised output is written, and the values are the module's, bit for bit."""
    ref = nn.RMSNorm(67, eps=1e-6)
    x = torch.randn(5, 67, requires_grad=True)
    impl = dispatch._REGISTRY["rms_norm_forward"]["torch"]
    monkeypatch.setattr(impl, "fn", lambda *a, **k: pytest.fail("rms_norm_forward ran"))
    y = G.rms_norm_identity(x, ref.weight, 1e-6, forward_fn=ref.forward, backend="torch")
    assert torch.equal(y, ref(x))
    gy = torch.randn(5, 67)
    y.backward(gy)
    assert rel(x.grad, O.rms_norm_G(x, ref.weight, gy, 1e-6)) < 1e-6
