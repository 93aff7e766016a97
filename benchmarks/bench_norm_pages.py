"""C++ norms vs the torch fallback in a model-like loop of fresh allocations, one process per run.

What a model does to a norm kernel: every call gets a fresh output (the allocator maps new
memory for large tensors, so each call pays the first touch of its pages). Whether those pages
are 4 KiB or 2 MiB — and whether asking for 2 MiB pages stalls in the kernel's compaction —
depends on the machine's transparent-huge-page (THP) settings, so the spread is over processes,
not repeats: each run is its own process (``--processes``, default 5) and the table reports the
min / median / max of the loop total per backend, for

- ``thp=system``: the machine's settings as they are (printed with the table);
- ``thp=off``: THP disabled for the process (``prctl(PR_SET_THP_DISABLE)``, no root needed).

The C++ extension's huge-page advice for its outputs follows ``LRP_KERNELS_HUGE_PAGES``
(``auto``, the default: advise only where the kernel's ``defrag`` setting cannot stall a fault
in compaction; ``on``; ``off``); ``--advice`` runs the cpp backend under each given value.

    taskset -c 0,1 python benchmarks/bench_norm_pages.py                 # the goal's table
    python benchmarks/bench_norm_pages.py --processes 3 --calls 12        # quicker

Goal (issue 13, item 4): the C++ norm never loses to the torch fallback end to end here.
Prints a markdown table, then one JSON line per (backend, advice, thp) case.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PR_SET_THP_DISABLE = 41


def thp_settings() -> dict:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            out[name] = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
        except OSError:
            out[name] = "unavailable"
    return out


def child(args) -> None:
    """One run: ``--calls`` RMSNorm forwards over 4 rotating inputs, a fresh output each call."""
    if args.thp == "off":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE) failed")
    import torch
    sys.path.insert(0, str(ROOT))
    from lrp_kernels.backends import dispatch
    torch.set_num_threads(args.threads)
    rows, hidden = (int(v) for v in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, hidden, generator=g) for _ in range(4)]
    w = torch.randn(hidden, generator=g)
    fn = lambda x: dispatch.call("rms_norm_forward", x, w, 1e-6, backend=args.backend)  # noqa: E731
    fn(torch.randn(8, hidden))  # load / build the extension outside the timed loop
    calls = []
    t_start = time.perf_counter()
    for i in range(args.calls):
        t0 = time.perf_counter()
        y, _ = fn(xs[i % 4])
        calls.append((time.perf_counter() - t0) * 1e3)
        del y
    total = (time.perf_counter() - t_start) * 1e3
    print(json.dumps({"total_ms": total, "max_call_ms": max(calls), "median_call_ms": statistics.median(calls)}))


def run_case(args, backend: str, advice: str, thp: str) -> list[dict]:
    env = dict(os.environ, LRP_KERNELS_HUGE_PAGES=advice)
    runs = []
    for _ in range(args.processes):
        cmd = [sys.executable, __file__, "--child", "--backend", backend, "--thp", thp, "--shape", args.shape,
               "--calls", str(args.calls), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{backend}/{advice}/{thp} failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--calls", type=int, default=24)
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--advice", default="auto,on,off", help="LRP_KERNELS_HUGE_PAGES values for the cpp backend")
    p.add_argument("--thp", default="system,off")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="cpp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    settings = thp_settings()
    print(f"THP: enabled = {settings['enabled']}; defrag = {settings['defrag']}; {args.processes} processes "
          f"per case, {args.calls} calls over 4 rotating [{args.shape}] float32 inputs, {args.threads} threads\n")
    print("| backend | huge-page advice | THP | loop min ms | median | max | slowest call ms (max) |")
    print("|---|---|---|---|---|---|---|")
    lines = []
    for thp in args.thp.split(","):
        cases = [("torch", "-")] + [("cpp", a) for a in args.advice.split(",")]
        for backend, advice in cases:
            runs = run_case(args, backend, "auto" if advice == "-" else advice, thp)
            totals = [r["total_ms"] for r in runs]
            row = {"backend": backend, "advice": advice, "thp": thp, "min_ms": min(totals),
                   "median_ms": statistics.median(totals), "max_ms": max(totals),
                   "max_call_ms": max(r["max_call_ms"] for r in runs), "runs": totals,
                   "shape": args.shape, "calls": args.calls, "threads": args.threads, **settings}
            lines.append(row)
            print(f"| {backend} | {advice} | {thp} | {row['min_ms']:.0f} | {row['median_ms']:.0f} | "
                  f"{row['max_ms']:.0f} | {row['max_call_ms']:.1f} |", flush=True)
    print()
    for row in lines:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
