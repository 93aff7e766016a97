"""Benchmark the gamma-rule linear backward on a GPU: fused Triton kernels vs the torch
backend of ``linear_gamma_backward`` vs the generic four-copy :class:`BasicHook` path, with a
plain ``grad_z @ W`` GEMM of the same shape as the floor. All baselines are measured in this
run (``triton.testing.do_bench`` medians, ms). ViT-B/L-like shapes (tokens x hidden -> MLP).

Prints a table, then one JSON line per case. Without CUDA it says so and exits 0.

    PYTHONPATH=. python benchmarks/bench_gamma.py [--quick] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def generic_backward(grad, x, W, b, gamma, eps):
    """The generic Gamma rule (four modified copies + one autograd VJP), as BasicHook runs it."""
    from lrp_kernels.hooks.core import stabilize
    from lrp_kernels.hooks.rules import Gamma
    lin = torch.nn.Linear(W.shape[1], W.shape[0], device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    rule = Gamma(gamma, lambda z: stabilize(z, eps))   # callable stabiliser: generic path
    rule.stored_tensors = {"input": (x,), "versions": (x._version,), "kwargs": {}}
    return rule.backward(lin, (x,), (grad,))[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gamma: no CUDA device, nothing to measure")
        return 0
    from lrp_kernels.backends import dispatch
    from lrp_kernels.ops import linear_gamma  # noqa: F401
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cases = [(197 * 8, 768, 3072), (197 * 8, 3072, 768), (257 * 8, 1024, 4096), (257 * 8, 4096, 1024)]
    if args.quick:
        cases = cases[:2]
    rows = []
    gamma, eps = 0.25, 1e-6
    for m, k, n in cases:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        W = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=dtype) * 0.1
        g = torch.randn(m, n, device="cuda", dtype=dtype)
        fused = dispatch.call("linear_gamma_backward", g, x, W, b, None, gamma, eps, True, backend="triton")
        ref = dispatch.call("linear_gamma_backward", g.double(), x.double(), W.double(), b.double(), None,
                            gamma, eps, True, backend="torch")
        err = ((fused.double() - ref).norm() / ref.norm()).item()
        t_fused = bench(lambda: dispatch.call("linear_gamma_backward", g, x, W, b, None, gamma, eps, True,
                                              backend="triton"))
        t_torch = bench(lambda: dispatch.call("linear_gamma_backward", g, x, W, b, None, gamma, eps, True,
                                              backend="torch"))
        t_generic = bench(lambda: generic_backward(g, x, W, b, gamma, eps))
        t_gemm = bench(lambda: g @ W)
        rows.append({"op": "linear_gamma_backward", "m": m, "k": k, "n": n, "dtype": args.dtype,
                     "device": torch.cuda.get_device_name(0), "fused_ms": t_fused, "torch_op_ms": t_torch,
                     "generic_hook_ms": t_generic, "gemm_ms": t_gemm, "rel_err_vs_fp64": err,
                     "speedup_vs_torch_op": t_torch / t_fused, "speedup_vs_generic": t_generic / t_fused,
                     "x_gemm": t_fused / t_gemm})
    print(f"{'M':>6} {'K':>5} {'N':>5} {'fused':>8} {'torch op':>9} {'generic':>8} {'GEMM':>7} "
          f"{'vs op':>6} {'vs gen':>7} {'rel err':>9}")
    for r in rows:
        print(f"{r['m']:>6} {r['k']:>5} {r['n']:>5} {r['fused_ms']:8.3f} {r['torch_op_ms']:9.3f} "
              f"{r['generic_hook_ms']:8.3f} {r['gemm_ms']:7.3f} {r['speedup_vs_torch_op']:5.2f}x "
              f"{r['speedup_vs_generic']:6.2f}x {r['rel_err_vs_fp64']:9.2e}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
