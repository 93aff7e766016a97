"""The gradient view's epsilon factor as kernel ops: ``q = eps / (|z| + eps)`` in ``z``'s dtype
(``epsilon_factor_gradient``) and its application ``G_y (1 - q) / share``
(``epsilon_output_backward``), on every backend, against the float64 formula.

Tolerances: float64 1e-12 relative; float32 2e-6 (the formula's two roundings); bfloat16 /
float16 one rounding of the stored result (2**-8 / 2**-11 relative, plus float16's subnormal
step where q is below its normal range).
"""
import pytest
import torch

from lrp_kernels.backends import dispatch

from helpers.cpp import extension_or_skip

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
BACKENDS = ["torch", "cpp"]


def _z(shape, dtype, seed, layout):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    flat = z.view(-1)
    flat[::7] = 0.0                     # exact zeros: q = 1, the rule passes nothing
    flat[1::11] *= 1e-7                 # within a few eps of zero
    flat[2::13] = float("inf")          # q = 0
    z = z.to(dtype)
    if layout == "transposed":
        z = z.transpose(-1, -2).contiguous().transpose(-1, -2)
    return z


def _backend(backend):
    if backend == "cpp":
        extension_or_skip()
    return backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_factor_matches_float64_formula(backend, dtype, layout, eps):
    z = _z((3, 37, 29), dtype, seed=1, layout=layout)
    q = dispatch.call("epsilon_factor_gradient", z, eps, dtype, backend=_backend(backend))
    want = eps / (z.double().abs() + eps)
    assert q.dtype == dtype and q.shape == z.shape
    info = torch.finfo(dtype)
    subnormal_step = info.tiny * info.eps  # float16 stores q ~ 3e-7 as a subnormal
    bound = TOL[dtype] * want.abs() + subnormal_step
    assert torch.isfinite(q).all() and bool(((q.double() - want).abs() <= bound).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("share", [1.0, 2.0])
def test_output_backward_matches_float64_formula(backend, dtype, share):
    z = _z((5, 41), dtype, seed=2, layout="contiguous")
    g = torch.randn(5, 41, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    q = dispatch.call("epsilon_factor_gradient", z, 1e-6, dtype, backend="torch")
    got = dispatch.call("epsilon_output_backward", g, q, share, backend=_backend(backend))
    want = g.double() * (1 - q.double()) / share
    assert got.dtype == dtype and got.shape == g.shape
    scale = want.abs().max()
    assert ((got.double() - want).abs().max() / scale).item() <= 2 * TOL[dtype]


def test_factor_kept_in_another_dtype_and_mixed_dtypes_take_the_torch_path():
    """A factor asked for in another dtype, or a float64 factor for a float32 gradient, is
    served by torch under auto (the C++ kernel keeps z's dtype and computes in float32)."""
    extension_or_skip()
    z = torch.randn(4, 8)
    assert dispatch.chosen_backend("epsilon_factor_gradient", z, 1e-6, z.dtype) == "cpp"
    assert dispatch.chosen_backend("epsilon_factor_gradient", z, 1e-6, torch.float64) == "torch"
    q64 = torch.rand(4, 8, dtype=torch.float64)
    assert dispatch.chosen_backend("epsilon_output_backward", z, q64, 1.0) == "torch"
    assert dispatch.chosen_backend("epsilon_output_backward", z, q64.float(), 1.0) == "cpp"
