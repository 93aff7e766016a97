"""The Triton backend's machinery (lrp_kernels.backends.triton): why a kernel refuses inputs
(``supports``), the probe's reasons with and without CUDA / the interpreter, and that importing
the package never needs triton. The kernels' numbers are checked in the op files of tests/ops/.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import lrp_kernels.backends.triton as tb

from helpers.kernels import DEV, needs_triton


@needs_triton
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


@needs_triton
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

