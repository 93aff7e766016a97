"""Benchmark the fused Triton kernels against the torch backend (and a plain GEMM) on a GPU.

Llama-3-8B-like shapes (hidden 4096, intermediate 14336, 32 heads of dim 128), bf16,
sequence lengths 1k-16k (``--quick``: a few cases, ~1 min). Timings are
``triton.testing.do_bench`` medians; every baseline is measured in the same run.

* ``linear_epsilon_backward`` (relevance view): fused GEMM vs the torch backend vs a plain
  ``grad_z @ W`` of the same shape (the floor: the rule adds only element-wise work).
  Goals: <= 1.15x the plain GEMM, >= 1.5x faster than the torch backend.
* ``softmax_dt_backward`` over attention scores ``[1, H, S, S]``: GB/s (reads grad, x, s;
  writes the result) vs a device-to-device copy measured here. Goal: >= 80 % of it.
* ``matmul_ue_backward`` for ``Q @ K^T`` and ``P @ V``: fused vs torch backend vs the two
  plain GEMMs.

Prints a table, then one JSON line per case. Without CUDA it says so and exits 0.

    PYTHONPATH=. python benchmarks/bench_ops.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HIDDEN, INTER, HEADS, HEAD_DIM = 4096, 14336, 32, 128


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_err(got, want) -> float:
    """Norm-wise relative error of the fused result vs the torch backend (autotuned configs)."""
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    worst = 0.0
    for g_, w_ in zip(got, want):
        g_, w_ = g_.float(), w_.float()
        if not torch.isfinite(g_).all():
            return float("inf")
        worst = max(worst, ((g_ - w_).norm() / w_.norm().clamp_min(1e-30)).item())
    return worst


def impls(op: str):
    from lrp_kernels.backends import dispatch

    dispatch.backend_status("triton")  # loads the kernels
    reg = dispatch._REGISTRY[op]
    return reg["triton"].fn, reg["torch"].fn


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (read + write): the practical memory roofline."""
    src = torch.empty(512 * 2**20, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * 512 * 2**20 * 2 / ms / 1e6


def linear_cases(quick: bool):
    seqs = [4096] if quick else [1024, 4096, 16384]
    layers = [("qo_proj", HIDDEN, HIDDEN), ("up_proj", INTER, HIDDEN), ("down_proj", HIDDEN, INTER)]
    if quick:
        layers = layers[1:]
    for s in seqs:
        for name, n_out, k_in in layers:
            yield s, name, n_out, k_in


def bench_linear(quick: bool, views) -> list[dict]:
    fused, fallback = impls("linear_epsilon_backward")
    rows = []
    for s, name, n_out, k_in in linear_cases(quick):
        for relevance in views:
            torch.manual_seed(0)
            x = torch.randn(s, k_in, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) * k_in ** -0.5
            b = torch.randn(n_out, device="cuda", dtype=torch.bfloat16)
            z = torch.nn.functional.linear(x, w, b)
            g = torch.randn_like(z)
            t_fused = bench(lambda: fused(g, x, w, b, z, 1e-6, relevance))
            t_recompute = bench(lambda: fused(g, x, w, b, None, 1e-6, relevance))
            t_torch = bench(lambda: fallback(g, x, w, b, z, 1e-6, relevance))
            t_gemm = bench(lambda: g @ w)
            err = rel_err(fused(g, x, w, b, z, 1e-6, relevance), fallback(g, x, w, b, z, 1e-6, relevance))
            from lrp_kernels.backends.triton.linear_epsilon import _eps_gemm_tuned
            config = str(getattr(_eps_gemm_tuned, "best_config", ""))
            from lrp_kernels.backends import dispatch  # what auto serves here (measured once per shape class)
            auto_choice = dispatch.chosen_backend("linear_epsilon_backward", g, x, w, b, z, 1e-6, relevance)
            flops = 2 * s * n_out * k_in
            nbytes = 2 * (2 * s * n_out + n_out * k_in + (2 if relevance else 1) * s * k_in)
            rows.append({
                "op": "linear_epsilon_backward", "case": f"{name} seq={s}", "view": "R" if relevance else "G",
                "shape": [s, n_out, k_in], "dtype": "bfloat16",
                "ms": {"fused": t_fused, "fused_recompute_z": t_recompute, "torch": t_torch, "gemm": t_gemm},
                "tflops_fused": flops / t_fused / 1e9, "tflops_gemm": flops / t_gemm / 1e9,
                "gbps_fused": nbytes / t_fused / 1e6,
                "fused_over_gemm": t_fused / t_gemm, "speedup_vs_torch": t_torch / t_fused,
                "goal_met": t_fused / t_gemm <= 1.15 and t_torch / t_fused >= 1.5, "rel_err_vs_torch": err,
                "autotuned_config": config, "auto_choice": auto_choice,
            })
            del x, w, b, z, g
    return rows


def bench_softmax(quick: bool, views, peak_gbps: float) -> list[dict]:
    fused, fallback = impls("softmax_dt_backward")
    # [1, H, S, S] scores; H trimmed so one tensor stays <= 2 GiB
    cases = [(1024, HEADS), (4096, 16)] if quick else [(1024, HEADS), (4096, HEADS), (8192, 8), (16384, 4)]
    rows = []
    for s_len, heads in cases:
        for relevance in views:
            torch.manual_seed(0)
            x = torch.randn(1, heads, s_len, s_len, device="cuda", dtype=torch.bfloat16)
            x.masked_fill_(torch.ones(s_len, s_len, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
            s = torch.softmax(x, -1)
            g = torch.randn_like(s) * s
            t_fused = bench(lambda: fused(g, x, s, 3, 1.0, relevance))
            t_torch = bench(lambda: fallback(g, x, s, 3, 1.0, relevance))
            err = rel_err(fused(g, x, s, 3, 1.0, relevance), fallback(g, x, s, 3, 1.0, relevance))
            nbytes = 4 * x.numel() * 2
            gbps = nbytes / t_fused / 1e6
            rows.append({
                "op": "softmax_dt_backward", "case": f"causal scores H={heads} S={s_len}",
                "view": "R" if relevance else "G", "shape": list(x.shape), "dtype": "bfloat16",
                "ms": {"fused": t_fused, "torch": t_torch}, "gbps_fused": gbps,
                "gbps_torch_equiv": nbytes / t_torch / 1e6, "copy_gbps": peak_gbps,
                "fraction_of_copy_bw": gbps / peak_gbps, "speedup_vs_torch": t_torch / t_fused,
                "goal_met": gbps / peak_gbps >= 0.8, "rel_err_vs_torch": err,
            })
            del x, s, g
    return rows


def bench_matmul(quick: bool, views) -> list[dict]:
    fused, fallback = impls("matmul_ue_backward")
    seqs = [1024, 4096] if quick else [1024, 4096, 8192]
    rows = []
    for s_len in seqs:
        for kind in ("QK^T", "PV"):
            for relevance in views:
                torch.manual_seed(0)
                if kind == "QK^T":
                    a = torch.randn(1, HEADS, s_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    b = torch.randn(1, HEADS, HEAD_DIM, s_len, device="cuda", dtype=torch.bfloat16)
                else:
                    a = torch.softmax(torch.randn(1, HEADS, s_len, s_len, device="cuda", dtype=torch.bfloat16), -1)
                    b = torch.randn(1, HEADS, s_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                o = a @ b
                g = torch.randn_like(o)
                t_fused = bench(lambda: fused(g, a, b, o, 1e-6, relevance, True, True))
                t_torch = bench(lambda: fallback(g, a, b, o, 1e-6, relevance, True, True))
                t_gemm = bench(lambda: (g @ b.transpose(-1, -2), a.transpose(-1, -2) @ g))
                err = rel_err(fused(g, a, b, o, 1e-6, relevance, True, True),
                              fallback(g, a, b, o, 1e-6, relevance, True, True))
                m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
                flops = 2 * 2 * HEADS * m * n * k
                rows.append({
                    "op": "matmul_ue_backward", "case": f"{kind} S={s_len}", "view": "R" if relevance else "G",
                    "shape": [list(a.shape), list(b.shape)], "dtype": "bfloat16",
                    "ms": {"fused": t_fused, "torch": t_torch, "gemm": t_gemm},
                    "tflops_fused": flops / t_fused / 1e9, "tflops_gemm": flops / t_gemm / 1e9,
                    "fused_over_gemm": t_fused / t_gemm, "speedup_vs_torch": t_torch / t_fused,
                    "rel_err_vs_torch": err,
                })
                del a, b, o, g
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<24} {'case':<26} {'view':<4} {'fused ms':>9} {'torch ms':>9} {'gemm ms':>8} "
          f"{'x torch':>7} {'/gemm':>6} {'TFLOP/s':>8} {'GB/s':>7} {'err':>8}  goal")
    for r in rows:
        ms = r["ms"]
        gemm = f"{ms['gemm']:>8.3f}" if "gemm" in ms else f"{'':>8}"
        over = f"{r['fused_over_gemm']:>6.2f}" if "fused_over_gemm" in r else f"{'':>6}"
        tf = f"{r['tflops_fused']:>8.1f}" if "tflops_fused" in r else f"{'':>8}"
        gb = f"{r['gbps_fused']:>7.0f}" if "gbps_fused" in r else f"{'':>7}"
        goal = {True: "met", False: "MISSED", None: ""}[r.get("goal_met")]
        print(f"{r['op']:<24} {r['case']:<26} {r['view']:<4} {ms['fused']:>9.3f} {ms['torch']:>9.3f} {gemm} "
              f"{r['speedup_vs_torch']:>7.2f} {over} {tf} {gb} {r['rel_err_vs_torch']:>8.1e}  {goal}")
        extra = ms.get("fused_recompute_z")
        if extra is not None:
            print(f"{'':<24} {'  (z recomputed: F.linear + fused)':<31} {extra:>9.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few shapes (about a minute)")
    p.add_argument("--ops", default="linear,softmax,matmul", help="comma list of linear,softmax,matmul")
    p.add_argument("--views", default="R,G", help="R (relevance), G (gradient) or both (default R,G)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops: no CUDA device here; the benchmark needs a GPU (nothing measured).")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_ops: triton is not importable; nothing measured.")
        return 0
    views = [v.strip() == "R" for v in args.views.split(",")]
    ops = {o.strip() for o in args.ops.split(",")}
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"triton {__import__('triton').__version__}; quick={args.quick}; "
          f"LRP_KERNELS_TRITON_SWAP_AB={os.environ.get('LRP_KERNELS_TRITON_SWAP_AB', '0')}", flush=True)
    rows: list[dict] = []
    if "linear" in ops:
        rows += bench_linear(args.quick, views)
    if "softmax" in ops:
        rows += bench_softmax(args.quick, views, copy_bandwidth())
    if "matmul" in ops:
        rows += bench_matmul(args.quick, views)
    print_table(rows)
    for r in rows:
        print(json.dumps({"bench": "bench_ops", "device": torch.cuda.get_device_name(0), **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
