#!/usr/bin/env python
"""Do the backends agree? Per kernel op (vs a float64 oracle) and end to end (a heatmap).

1. ``lrp_kernels.tools.compare``: every kernel op on every available backend vs the float64 oracle
   of SPEC.md and vs the torch backend (what ``lrp-kernels compare`` prints);
2. end to end: ``lrp_kernels.explanations.api`` on the shipped recall model with each available
   backend, relevance compared with the torch backend's.

    python python/compare_backends.py [--sizes 37,45,29] [--device cpu]

On CPU without CUDA the Triton kernels run through the interpreter (slow; small sizes).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lrp_kernels  # noqa: E402
from lrp_kernels.tools import compare as cmp  # noqa: E402
from lrp_kernels.cli.explain import SHIPPED_MODEL  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="37,45,29", help="M,N,K of the random op inputs")
    ap.add_argument("--ops", default=None, help="comma-separated kernel ops (default: all)")
    ap.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=SHIPPED_MODEL)
    ap.add_argument("--prompt", default="k7 23 ; k3 19 ; k12 5 ; ? k3")
    args = ap.parse_args(argv)

    sizes = tuple(int(v) for v in args.sizes.split(","))
    ops = args.ops.split(",") if args.ops else None
    backends = args.backends.split(",") if args.backends else None
    rows = cmp.compare(sizes, torch.float32, args.device, ops, backends)
    print(cmp.format_table(rows))
    failed = [r for r in rows if r["status"] == "MISMATCH"]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    status = lrp_kernels.available_backends()
    ref = lrp_kernels.explain(model, tok, args.prompt, backend="torch")
    print(f"\nend to end, target {ref.target.text!r}: relevance vs the torch backend")
    for name, st in status.items():
        if backends and name not in backends:
            continue
        if not st["available"] or name == "torch":
            print(f"  {name:<7} skip: {st['reason'] if not st['available'] else 'reference'}")
            continue
        exp = lrp_kernels.explain(model, tok, args.prompt, backend=name)
        err = float((exp.relevance - ref.relevance).norm() / ref.relevance.norm().clamp_min(1e-30))
        same_top = exp.top(1)[0][0] == ref.top(1)[0][0]
        print(f"  {name:<7} relative error {err:.2e}, same top token: {same_top}")
        if err > 1e-4:
            failed.append({"backend": name, "op": "explain"})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
