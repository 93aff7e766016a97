"""``lrp-kernels compare`` (:mod:`lrp_kernels.cli.compare` over :mod:`lrp_kernels.tools.compare`) on tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lrp_kernels.backends import dispatch
from lrp_kernels.tools import compare
from lrp_kernels.cli import main as cli_main

TINY = ["--sizes", "5,7,3"]


@pytest.fixture(autouse=True)
def _fixed_gpu_config(monkeypatch):
    """On a GPU: one Triton tile config (no autotuning compiles) keeps this file quick."""
    monkeypatch.setenv("LRP_KERNELS_TRITON_AUTOTUNE", "0")
KERNEL_OPS = "linear_epsilon_backward,softmax_dt_backward,matmul_ue_backward"


def test_cli_all_ops_pass(capsys):
    assert cli_main(["compare", *TINY]) == 0
    out = capsys.readouterr().out
    for op in ("linear_epsilon_backward", "softmax_dt_backward", "matmul_ue_backward",
               "add_epsilon_backward", "rms_norm_forward", "layer_norm_backward"):
        assert op in out
    assert "MISMATCH" not in out


def test_json_rows_cover_triton_kernels(capsys):
    assert cli_main(["compare", *TINY, "--ops", KERNEL_OPS, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ran = {(r["op"], r["view"], r["backend"]) for r in rows if r["status"] == "ok"}
    for op in KERNEL_OPS.split(","):
        for view in ("R", "G"):
            assert (op, view, "torch") in ran
            if dispatch.backend_status("triton")[0]:
                assert (op, view, "triton") in ran
    for r in rows:
        if r["status"] == "ok":
            assert r["rel_vs_oracle"] <= r["tolerance"] and r["rel_vs_torch"] <= r["tolerance"]


def test_mismatch_exits_1(monkeypatch, capsys):
    """A wrong backend (the torch kernel off by 1 %) is caught: exit code 1."""
    real = dispatch._REGISTRY["softmax_dt_backward"]["torch"].fn

    def wrong(*args):
        return real(*args) * 1.01

    monkeypatch.setitem(dispatch._REGISTRY["softmax_dt_backward"], "cpp", dispatch._Impl(wrong, None))
    monkeypatch.setattr(dispatch, "backend_status",
                        lambda b, _orig=dispatch.backend_status: (True, "test") if b == "cpp" else _orig(b))
    assert cli_main(["compare", *TINY, "--ops", "softmax_dt_backward", "--backends", "torch,cpp"]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "cpp:softmax_dt_backward" in captured.err


@pytest.mark.parametrize("argv,needle", [
    (["--sizes", "5,7"], "--sizes"),
    (["--sizes", "5,0,3"], "--sizes"),
    (["--ops", "nope"], "--ops"),
    (["--backends", "tpu"], "--backends"),
])
def test_user_errors_exit_2(argv, needle, capsys):
    assert cli_main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_oracle_matches_tests_oracle():
    """The package's oracle and tests/helpers/oracle.py (independent) agree on exact inputs."""
    from helpers import oracle

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (4, 6), generator=gen) / 4.0
    w = torch.randint(-8, 9, (5, 6), generator=gen) / 4.0
    g = torch.randn(4, 5, generator=gen)
    z = x @ w.t()
    for rel, ref in ((True, oracle.linear_epsilon_R), (False, oracle.linear_epsilon_G)):
        got = compare.oracle_linear(g, x, w, None, z, 1e-6, rel)
        assert torch.allclose(got, ref(x, w, None, g, 1e-6), rtol=1e-12, atol=1e-12)
    logits = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    logits[0, :3] = float("-inf")
    rs = torch.softmax(logits, -1) * torch.randn(3, 9, generator=gen, dtype=torch.float64)
    s = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(compare.oracle_softmax(rs, logits, s, 1, 0.5, True),
                          oracle.softmax_R(logits, rs, dim=1, T=0.5), atol=1e-12)
    assert torch.allclose(compare.oracle_softmax(rs, logits, s, 1, 0.5, False),
                          oracle.softmax_G(logits, rs, dim=1, T=0.5), atol=1e-12)


def test_module_entry_point():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "lrp_kernels.cli", "compare", *TINY, "--ops",
                          "matmul_ue_backward", "--backends", "torch,triton"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "matmul_ue_backward" in res.stdout and "TRITON_INTERPRET=" in res.stdout
