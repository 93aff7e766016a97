"""``lrp-kernels compare``: every backend vs a float64 oracle and the torch backend, per op.

The work is in :mod:`lrp_kernels.tools.compare`; this module is the command line around it.
Exit code 1 when an error exceeds the dtype's tolerance, 2 for a user mistake.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import CLIError, int_at_least


def add_parser(sub) -> argparse.ArgumentParser:
    from ..tools.compare import DTYPES

    p = sub.add_parser(
        "compare", help="check every backend against a float64 oracle and the torch backend",
        description="Run each kernel op on every available backend on random inputs and print the "
                    "max abs / relative error vs a float64 oracle of the rules and vs the torch "
                    "backend. Exit 1 on an error beyond the dtype's tolerance. On CPU without CUDA, "
                    "Triton kernels run through the interpreter (TRITON_INTERPRET=1 is set; "
                    "--no-interpret to skip them).")
    p.add_argument("--sizes", default="37,45,29", metavar="M,N,K",
                   help="rows, width (output features / softmax length), inner size (default 37,45,29)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--ops", default=None, help="comma-separated kernel ops (default: all)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    p.add_argument("--seed", type=int_at_least(0, 2**63 - 1), default=0,
                   help="random seed, 0 <= seed < 2**63 (default 0)")
    p.add_argument("--interpret", dest="interpret", action="store_true", default=True,
                   help="on CPU, run Triton kernels through the interpreter (default; sets TRITON_INTERPRET=1)")
    p.add_argument("--no-interpret", dest="interpret", action="store_false",
                   help="do not set TRITON_INTERPRET on CPU (triton is then unavailable without CUDA)")
    p.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
    p.set_defaults(func=run)
    return p


def parse_sizes(text: str) -> tuple[int, int, int]:
    """``"M,N,K"`` -> three positive integers, else :class:`CLIError` naming ``--sizes``."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise CLIError(f"--sizes must be three positive integers M,N,K, got {text!r}")
    return sizes  # type: ignore[return-value]


def _csv(text):
    return [v.strip() for v in text.split(",")] if text else None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lrp-kernels compare``; returns the exit code."""
    sizes = parse_sizes(args.sizes)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = str(torch.device(device))
    except RuntimeError:
        raise CLIError(f"--device must be cpu or cuda[:i], got {args.device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device here (use --device cpu)")
    if device == "cpu" and args.interpret and not torch.cuda.is_available():
        if "lrp_kernels.backends.triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("compare: triton kernels were already loaded without the interpreter; "
                  "triton rows may be skipped", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by the lazy loader
    from ..tools.compare import DTYPES, TOLERANCE, compare, format_table

    dtype = DTYPES[args.dtype]
    try:
        rows = compare(sizes, dtype, device, _csv(args.ops), _csv(args.backends), args.seed)
    except ValueError as err:  # "ops: ..." / "backends: ..." -> the flag's name
        raise CLIError(f"--{err}") from None
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"sizes M,N,K={sizes} dtype={args.dtype} device={device} "
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')} tolerance={TOLERANCE[dtype]:g}")
        print(format_table(rows))
    bad = [r for r in rows if r["status"] == "MISMATCH"]
    if bad:
        print(f"compare: {len(bad)} mismatch(es) beyond tolerance "
              f"({', '.join(sorted({r['backend'] + ':' + r['op'] for r in bad}))})", file=sys.stderr)
        return 1
    return 0
