"""Fixtures of the op tests' kernel checks (Triton backend)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def fixed_triton_config(monkeypatch):
    """One tile config on GPU (autotuning would compile seven per variant); the benchmark
    checks the autotuned configs' results against the torch backend."""
    monkeypatch.setenv("LRP_KERNELS_TRITON_AUTOTUNE", "0")


@pytest.fixture
def poison(monkeypatch):
    """Triton outputs start as NaN, so an element a kernel forgot to write shows up as NaN;
    returns the list of allocations (proves the kernel path ran)."""
    import lrp_kernels.backends.triton as tb
    made = []

    def alloc(shape, dtype, device):
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(tb, "alloc_output", alloc)
    return made
