"""C++ norm kernels vs the PyTorch fallback vs torch.compile of the fallback (CPU).

Times the kernel ops of lrp_kernels/ops/norm.py on [tokens, hidden] inputs: RMSNorm forward and
its gradient-view backward (and, with ``--ops rms,ln``, LayerNorm forward and both backward
views). All backends run in this process on the same inputs; the time is the median of
``--repeats`` runs after a warm-up. Prints a table, then one JSON line per case.

    taskset -c 0,1 python benchmarks/bench_norm.py --threads 2
    python benchmarks/bench_norm.py --shapes 2048x2048 --dtypes float32 --no-compile   # quick

Goal (issue "C++ extension: RMSNorm-identity"): C++ >= 2x faster than the torch fallback and
not slower than torch.compile of it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrp_kernels.backends import dispatch  # noqa: E402
from lrp_kernels.ops import norm as norm_ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and, for torch.compile, compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cases(ops: list[str], x, w, b, gy):
    """(name, {backend: zero-arg callable}) per timed op; 'compile' wraps the torch fallback."""
    out = []
    if "rms" in ops:
        _, rstd = norm_ops.rms_norm_forward_torch(x, w, 1e-6)
        out.append(("rms_norm_forward", norm_ops.rms_norm_forward_torch, "rms_norm_forward", (x, w, 1e-6)))
        out.append(("rms_norm_backward[G]", norm_ops.rms_norm_backward_torch, "rms_norm_backward", (gy, w, rstd)))
    if "ln" in ops:
        _, mu, rs = norm_ops.layer_norm_forward_torch(x, w, b, 1e-5)
        out.append(("layer_norm_forward", norm_ops.layer_norm_forward_torch, "layer_norm_forward", (x, w, b, 1e-5)))
        for rel, tag in ((False, "G"), (True, "R")):
            out.append((f"layer_norm_backward[{tag}]", norm_ops.layer_norm_backward_torch, "layer_norm_backward",
                        (gy, x, w, b, mu, rs, 1e-6, rel)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x2048,4096x4096,8192x4096", help="tokens x hidden, comma separated")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma separated, of {list(DTYPES)}")
    p.add_argument("--ops", default="rms", help="rms, ln or rms,ln")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the fallback")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ops = [o.strip() for o in args.ops.split(",")]

    ok, why = dispatch.backend_status("cpp")
    if not ok:
        print(f"cpp backend unavailable: {why}", file=sys.stderr)
        return 1
    from lrp_kernels.backends import cpp as _cpp

    t0 = time.perf_counter()
    _cpp.load_extension()
    print(f"# extension ready in {time.perf_counter() - t0:.1f} s ({_cpp.build_dir()})")
    print(f"# {platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()} "
          f"torch {torch.__version__} repeats={args.repeats} (median ms)")

    compiled = {}
    rows, lines = [], []
    for shape_s in args.shapes.split(","):
        T, H = (int(v) for v in shape_s.lower().split("x"))
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname.strip()]
            g = torch.Generator().manual_seed(0)
            x = torch.randn(T, H, generator=g).to(dtype)
            gy = torch.randn(T, H, generator=g).to(dtype)
            w = (torch.randn(H, generator=g) + 1).to(dtype)
            b = torch.randn(H, generator=g).to(dtype)
            for name, torch_fn, op, a in cases(ops, x, w, b, gy):
                cpp_fn = dispatch._REGISTRY[op]["cpp"].fn
                res = {"cpp": median_ms(lambda: cpp_fn(*a), args.repeats),
                       "torch": median_ms(lambda: torch_fn(*a), args.repeats)}
                res["compile"] = None
                if not args.no_compile:
                    try:
                        cfn = compiled.setdefault(name, torch.compile(torch_fn, dynamic=False))
                        res["compile"] = median_ms(lambda: cfn(*a), args.repeats)
                    except Exception as err:  # inductor needs a working compiler; report, go on
                        print(f"# torch.compile failed for {name}: {type(err).__name__}: {err}"[:300])
                rec = {"bench": "norm", "op": name, "tokens": T, "hidden": H, "dtype": dname,
                       "threads": torch.get_num_threads(), "cpp_ms": round(res["cpp"], 3),
                       "torch_ms": round(res["torch"], 3),
                       "compile_ms": None if res["compile"] is None else round(res["compile"], 3),
                       "speedup_vs_torch": round(res["torch"] / res["cpp"], 2),
                       "speedup_vs_compile": None if res["compile"] is None else round(res["compile"] / res["cpp"], 2)}
                rows.append(rec)
                lines.append(json.dumps(rec))
                fmt = lambda v: "   n/a" if v is None else f"{v:8.2f}"  # noqa: E731
                print(f"{name:<22} {T:>5}x{H:<5} {dname:<8} cpp {rec['cpp_ms']:8.2f}  torch {rec['torch_ms']:8.2f}  "
                      f"compile {fmt(rec['compile_ms'])}  x{rec['speedup_vs_torch']:.2f} vs torch  "
                      f"x{fmt(rec['speedup_vs_compile']).strip()} vs compile", flush=True)
    print()
    print("| op | tokens x hidden | dtype | C++ ms | torch ms | compile ms | vs torch | vs compile |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        c = "n/a" if r["compile_ms"] is None else f"{r['compile_ms']:.2f}"
        s = "n/a" if r["speedup_vs_compile"] is None else f"{r['speedup_vs_compile']:.2f}x"
        print(f"| {r['op']} | {r['tokens']}x{r['hidden']} | {r['dtype']} | {r['cpp_ms']:.2f} | {r['torch_ms']:.2f} "
              f"| {c} | {r['speedup_vs_torch']:.2f}x | {s} |")
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
