"""Inputs and calls for the backend-kernel tests (``dispatch.call`` of one op on one backend).

Inputs for oracle comparisons are dyadic (small multiples of 1/8): ``x @ W.T`` is then exact in
float32, so the float32 ``z`` a kernel divides by is the oracle's float64 ``z``; with gaussian
inputs a ``z`` near 0 amplifies float32 rounding (ill-conditioned, not a bug). Gaussian inputs
are compared with the torch backend (same float32 ``z``).

Tolerances (norm-wise relative): float32 1e-5; on GPU bf16 2e-2, fp16 5e-3 (TF32 dot).
"""
from __future__ import annotations

import pytest
import torch

import lrp_kernels
from lrp_kernels.backends import dispatch

TRITON_OK, TRITON_WHY = dispatch.backend_status("triton")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dyadic(*shape, gen, scale=8):
    return (torch.randint(-2 * scale, 2 * scale + 1, shape, generator=gen) / scale).to(DEV)


def gauss(*shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(DEV, dtype)


def triton_call(op, *args):
    """``op`` on the triton backend, asserting the dispatcher really chose it (no fallback)."""
    with lrp_kernels.use_backend("triton"):
        name, _ = dispatch.resolve(op, *args)
        assert name == "triton"
        return dispatch.call(op, *args)
