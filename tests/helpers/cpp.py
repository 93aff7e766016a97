"""Inputs, tolerances and comparisons of the C++ backend tests (csrc/, lrp_kernels.backends.cpp):
RMSNorm-identity and LayerNorm kernels, used by tests/ops/test_norm.py (the kernels) and
tests/backends/test_cpp_build.py (building, loading, falling back).

Tolerances (norm-wise relative error ||a - b|| / ||b|| unless stated):
* float32 vs oracle: 1e-5 (SPEC); the LayerNorm relevance view divides by ``stab(x - mean)`` and
  ``stab(y)``, which amplifies the float32 rounding of the centring and of ``y`` wherever they are
  near zero (up to ~1e-3 on random inputs, in the torch fallback as much as here), so there the
  bound is max(1e-5, 4 x the torch fallback's own error vs the oracle on the same input);
* bfloat16 / float16 vs oracle: 1e-2 (outputs are rounded to 8 / 11 significant bits);
* vs the torch fallback, element-wise: float32 rtol 1e-5; bf16 / fp16 one unit in the last
  place of the output (both compute in float32, with different summation orders).
The extension is built once per machine (cached in the user cache; ~30-60 s cold).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrp_kernels.backends import dispatch

from . import oracle as O

dispatch._ensure_loaded("cpp")
from lrp_kernels.backends import cpp as _cpp  # noqa: E402  (registered by the line above, as dispatch does it)

REPO = Path(__file__).resolve().parents[2]
CSRC = _cpp.source_dir() or REPO / "csrc"  # shipped in the package, or the checkout's top level
OPS = ("rms_norm_forward", "rms_norm_backward", "layer_norm_forward", "layer_norm_backward")
ORACLE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ULP_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def extension_or_skip():
    """The compiled extension (built once per machine; skips only where nothing can build it)."""
    problem = _cpp.toolchain_problem()
    if problem:
        pytest.skip(f"C++ extension cannot be built here: {problem}")
    if _cpp.disabled():
        pytest.skip(f"{_cpp.ENV_DISABLE} is set")
    return _cpp.load_extension()


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def close_to_torch(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.double(), b.double(), rtol=ULP_RTOL[dtype], atol=1e-6)


def assert_ln_relevance(out, x, w, b, gy, eps, epsilon, dtype):
    """LayerNorm relevance view vs the oracle, within 4x the torch fallback's error (see the top)."""
    want = O.layer_norm_R(x, w, b, gy, eps, epsilon)
    _, mu, rs = dispatch.call("layer_norm_forward", x, w, b, eps, backend="torch")
    fallback = dispatch.call("layer_norm_backward", gy, x, w, b, mu, rs, epsilon, True, backend="torch")
    assert torch.isfinite(out).all()
    assert rel(out, want) <= max(ORACLE_TOL[dtype], 4 * rel(fallback, want))


def _away_from_zero(t):
    """Random signs, magnitudes >= 0.5."""
    return torch.where(t < 0, -1.0, 1.0) * (0.5 + t.abs())


def inputs(shape, dtype, seed, weight=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    # Bounded away from the LayerNorm relevance view's singular points (x_i == mean(x), y_i == 0),
    # where stab() turns the backends' different float32 summation orders into large relative
    # differences: |x_i - mean| >~ 0.4 (H > 1), |w| >= 0.5, |b| << |(x - mean) * rstd * w|.
    x = (_away_from_zero(torch.randn(shape, generator=g)) * 1.5 + 0.3).to(dtype)
    w = _away_from_zero(torch.randn(H, generator=g)).to(dtype) if weight else None
    b = (0.02 * torch.randn(H, generator=g)).to(dtype) if bias else None
    gy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, gy
