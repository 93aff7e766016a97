"""lrp_kernels.tools.profile and ``lrp-kernels profile`` on a tiny random Llama (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from lrp_kernels.cli import main
from lrp_kernels.tools.profile import build_model, format_table, profile


def test_profile_rows_tiny_model():
    model = build_model("llama-tiny", device="cpu", max_len=64)
    flags = [p.requires_grad for p in model.parameters()]
    rows = profile(model, [24, 40], warmup=8, progress=False)
    assert [(r["seq"], r["mode"]) for r in rows] == [(24, "plain"), (24, "lrp"), (40, "plain"), (40, "lrp")]
    for r in rows:
        assert r["finite"]
        assert r["forward_s"] > 0 and r["backward_s"] > 0
        assert abs(r["total_s"] - r["forward_s"] - r["backward_s"]) < 1e-9
        assert r["peak_bytes"] >= 0
    lrp = rows[1]
    assert lrp["time_ratio"] == pytest.approx(lrp["total_s"] / rows[0]["total_s"])
    assert "x time" in format_table(rows)
    # the model is left as it was: unpatched, same requires_grad flags, eval mode
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training
    assert model.config._attn_implementation == "sdpa"


def test_profile_repeats_are_interleaved_medians(monkeypatch):
    import lrp_kernels.tools.profile as P

    totals = iter([5.0, 1.0, 2.0, 4.0, 3.0, 6.0])  # plain, lrp, lrp, plain, plain, lrp

    def fake_once(model, ids, device, on_phase):
        t = next(totals)
        return {"forward_s": t / 2, "backward_s": t / 2, "total_s": t, "peak_bytes": int(t * 100), "finite": True}

    model = build_model("llama-tiny", device="cpu", max_len=64)
    monkeypatch.setattr(P, "_explain_once", fake_once)
    rows = P.profile(model, [16], warmup=0, progress=False, repeats=3)
    plain, lrp = rows
    assert plain["total_s_runs"] == [5.0, 4.0, 3.0] and lrp["total_s_runs"] == [1.0, 2.0, 6.0]
    assert plain["total_s"] == 4.0 and lrp["total_s"] == 2.0 and plain["repeats"] == 3
    assert plain["peak_bytes"] == 400 and lrp["time_ratio"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="repeats"):
        P.profile(model, [16], warmup=0, progress=False, repeats=0)


@pytest.mark.parametrize("kernel_peak", [True, False])
def test_rss_peak_sees_a_freed_allocation(kernel_peak, monkeypatch):
    """The peak of a block that allocates and frees 256 MiB (touched) is at least that, whether
    the kernel's counter (Linux VmHWM) or the sampling thread measures it."""
    import lrp_kernels.tools.profile as P

    if kernel_peak and not P._reset_kernel_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    if not kernel_peak:
        monkeypatch.setattr(P, "_reset_kernel_peak", lambda: False)
    with P._RssPeak() as rss:
        t = torch.ones(64 * 2**20)  # 256 MiB, every page touched
        if not kernel_peak:
            import time
            time.sleep(0.05)  # the sampler's turn
        del t
    assert rss.kernel_peak is kernel_peak
    assert rss.extra >= 200 * 2**20


def test_profile_with_checkpointing_restores_model():
    model = build_model("llama-tiny", device="cpu", max_len=64)
    rows = profile(model, [16], warmup=0, checkpointing=True, progress=False)
    assert all(r["finite"] and r["checkpointing"] for r in rows)
    assert not model.is_gradient_checkpointing and not model.training


def test_cli_json_lines(capsys):
    assert main(["profile", "--model", "llama-tiny", "--seq", "16,24", "--json", "--no-progress", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [(x["seq"], x["mode"]) for x in lines] == [(16, "plain"), (16, "lrp"), (24, "plain"), (24, "lrp")]
    assert all(x["model"] == "llama-tiny" and x["dtype"] == "float32" for x in lines)
    assert "memory_ratio" in lines[1]


@pytest.mark.parametrize("argv,msg", [
    (["--seq", "abc"], "--seq"),
    (["--seq", "0"], "--seq"),
    (["--model", "no-such-model"], "--model"),
    (["--batch", "0"], "--batch"),
])
def test_cli_bad_arguments(argv, msg, capsys):
    assert main(["profile", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_cuda_bf16():
    model = build_model("llama-tiny", device="cuda", dtype=torch.bfloat16, max_len=1024)
    rows = profile(model, [1024], progress=False)
    assert all(r["finite"] and r["peak_bytes"] > 0 for r in rows)
